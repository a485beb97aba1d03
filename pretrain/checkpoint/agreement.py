"""Decisions all ranks take together, on a gloo group of their own (host-side, no device sync)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class StepAgreement:
    """MAX over all ranks of a few flags, at every step boundary, on a gloo group of its own."""

    def __init__(self, world_size: int):
        self.group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30)) if world_size > 1 else None

    def any_rank(self, *flags: bool) -> list[bool]:
        values = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in values.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (decisions made once, taken everywhere)."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, on every rank."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
