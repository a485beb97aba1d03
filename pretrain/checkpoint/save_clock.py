"""How long checkpoint saves take, as the watchdog needs to know it: the time the training thread spends
in them is not a hang (it does not count against watchdog.step_timeout), and a save has a deadline
of its own (checkpoint.save_timeout), whether the training thread waits for it or not.

Written by the training thread and the checkpoint writer thread, read by the watchdog thread; each
field is one attribute assignment, atomic in CPython."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class SaveClock:
    def __init__(self) -> None:
        self._spent = 0.0  # the training thread's time in finished save calls
        self._since: float | None = None  # when it entered the one it is in
        self.writing: tuple[int, float] | None = None  # (step, monotonic start) of the save in flight

    @contextmanager
    def training_thread(self) -> Iterator[None]:
        """Around what the training thread does for a save: its copies, and waiting for a commit."""
        if self._since is not None:  # nested (a save that waits for the one before): counted once
            yield
            return
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._spent += time.monotonic() - self._since
            self._since = None

    def training_thread_seconds(self, now: float | None = None) -> float:
        """The training thread's time in saves so far, the one it is in included."""
        since = self._since
        return self._spent + ((now or time.monotonic()) - since if since is not None else 0.0)

    def started(self, step: int) -> None:
        self.writing = (step, time.monotonic())

    def finished(self) -> None:
        self.writing = None

    def overdue(self, timeout: float, now: float | None = None) -> tuple[int, float] | None:
        """(step, seconds so far) of a save in flight for longer than `timeout` seconds, else None."""
        writing = self.writing
        if writing is None or timeout <= 0:
            return None
        seconds = (now or time.monotonic()) - writing[1]
        return (writing[0], seconds) if seconds > timeout else None
