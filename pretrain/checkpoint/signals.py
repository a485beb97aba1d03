"""Preemption: SIGTERM, SIGUSR1 and SIGINT only raise a flag; the ranks agree on it at a step boundary.

A scheduler may signal one rank, some, or all, at slightly different moments. Each rank's flag is
combined with the others' at every step boundary (one all-reduce of a few integers on a gloo group
of its own, on the host: no device synchronisation), so all ranks stop after the same step, save
together, and exit with EXIT_REQUEUE. Signals arriving while that save is written are noted and
ignored: nothing interrupts the save, and the checkpoint stays whole.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# "A complete checkpoint was saved because of a signal; run the same command again to continue."
# 75 is EX_TEMPFAIL in sysexits.h: a temporary failure, try again later.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _deepspeed_command_pid() -> int | None:
    """Under DeepSpeed's launcher the process tree is `deepspeed` -> `deepspeed.launcher.launch` -> ranks:
    the `deepspeed` command's pid, else None."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            return parent.ppid()
    except psutil.Error:
        pass
    return None


class StopSignals:
    """Installs handlers for STOP_SIGNALS (main thread only) that record the first signal.

    DeepSpeed's single-node `deepspeed` command dies at once on SIGTERM without telling its ranks,
    which would go on training as orphans; so a rank under it also counts the command's
    disappearance as a stop signal."""

    def __init__(self, rank: int):
        self.rank = rank
        self.received: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._launcher = _deepspeed_command_pid()

    def stop_requested(self) -> bool:
        if self.received is None and self._launcher is not None and not _alive(self._launcher):
            self._handle(signal.SIGTERM, None, f"the deepspeed launcher (pid {self._launcher}) exited")
        return self.received is not None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum: int, frame: FrameType | None, why: str | None = None) -> None:
        self.count += 1
        name = why or f"received {signal.Signals(signum).name}"
        if self.received is None:
            self.received = signum
            message = f"{name}: saving a checkpoint after this step, then exiting with code {EXIT_REQUEUE}"
        else:
            message = (
                f"{name} again: already stopping; the checkpoint is being written and will not be cut short"
            )
        print(f"rank {self.rank}: {message}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
