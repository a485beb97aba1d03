"""Preemption: SIGTERM, SIGUSR1 and SIGINT only raise a flag; the ranks agree on it at a step boundary.

A scheduler may signal one rank, some, or all, at slightly different moments. Each rank's flag is
combined with the others' at every step boundary (`pretrain.checkpoint.agreement`: one all-reduce of
a few integers on a gloo group of its own, on the host: no device synchronisation), so all ranks
stop after the same step, save together, and exit with EXIT_REQUEUE. The handlers are installed as
soon as the configuration is read (this module imports no torch), so a signal during start-up or
resume also ends in EXIT_REQUEUE, with the newest complete checkpoint untouched. Signals arriving while that save is written are noted and
ignored: nothing interrupts the save, and the checkpoint stays whole.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from pretrain.errors import ExitCode
from pretrain.logs import EVERY_RANK, get_logger

log = get_logger(__name__)

EXIT_REQUEUE = ExitCode.REQUEUE  # a complete checkpoint was saved because of a signal: run again
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
        if self._previous:
            return  # installed already (main.py does it as early as it can)
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
        # Every rank that got it says so (a scheduler may signal some ranks only).
        log.warning(f"rank {self.rank}: {message}", extra=EVERY_RANK)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
