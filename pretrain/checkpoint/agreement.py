"""Decisions all ranks take together, on the training thread's side channel (host-side, no device
sync; `pretrain.parallel.host_group`)."""

from __future__ import annotations

from typing import Any

from pretrain.parallel.distributed import side_channel


class StepAgreement:
    """MAX over all ranks of a few flags at every step boundary, and the objects that resuming and
    saving agree on; a world of one agrees with itself."""

    def __init__(self, world_size: int):
        self.group = side_channel() if world_size > 1 else None

    def any_rank(self, *flags: bool) -> list[bool]:
        return self.group.any_rank(*flags) if self.group is not None else [bool(f) for f in flags]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (decisions made once, taken everywhere)."""
        return self.group.broadcast(obj) if self.group is not None else obj

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, on every rank."""
        return self.group.gather(obj) if self.group is not None else [obj]

    def barrier(self) -> None:
        if self.group is not None:
            self.group.barrier()
