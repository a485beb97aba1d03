"""One run at a time per run.dir: `run.dir/run.lock`, held by global rank 0 while the run lives.

Two runs writing one run.dir interleave their metrics and replace each other's checkpoints, so a
second start is refused (exit 2, naming the holder). `flock` alone is not enough: run dirs live on
NFS and Lustre, where advisory locks may not reach other nodes, and a lock must outlive nothing. So
the lock is a file created with O_EXCL (atomic on NFSv3+, Lustre, local disks) holding its owner's
host, pid, SLURM job and a token, and kept fresh by a heartbeat (its mtime, touched every
`HEARTBEAT_S`). A lock is stale, and taken over, when

- its owner ran on this host and that process is gone (or the pid is now another process);
- it belongs to this SLURM job and this is a later incarnation (a requeue: SLURM_RESTART_COUNT grew);
- its heartbeat is older than run.lock_stale_after seconds (an owner on another node that died
  with its node). Ages are measured on the filesystem's own clock, so node clock skew does not count.

A takeover renames the stale file away before creating a new one: of two starts racing for the same
stale lock only one rename succeeds, and the other start then finds a fresh lock and is refused.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pretrain.config.run import LOCK_HEARTBEAT_S
from pretrain.errors import ConfigError
from pretrain.logs import get_logger

LOCK_FILE = "run.lock"
VANISHED = "it vanished"  # a stale reason that leaves nothing to remove
HEARTBEAT_S = LOCK_HEARTBEAT_S
log = get_logger(__name__)
_held: set[RunLock] = set()  # for release_held_locks()


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds the lock of `run_dir`."""
    return any(lock.path == Path(run_dir) / LOCK_FILE for lock in _held)


def release_held_locks() -> None:
    """Release the locks this process holds: for a hard exit (the watchdog's os._exit) that skips the
    `finally` blocks which release them otherwise."""
    for lock in list(_held):
        lock.release()


@dataclass
class Holder:
    host: str
    pid: int
    pid_started: str  # the process's start time (/proc/<pid>/stat): tells a reused pid apart
    job_id: str | None
    restart_count: int
    token: str
    started: float

    @classmethod
    def this_process(cls) -> Holder:
        env = os.environ
        return cls(
            host=os.uname().nodename,
            pid=os.getpid(),
            pid_started=_process_start(os.getpid()) or "",
            job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"),
            restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
            token=uuid.uuid4().hex,
            started=time.time(),
        )

    def describe(self) -> str:
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}{job}, started {since}"


class RunLock:
    """The lock on one run.dir; `acquire` on rank 0 before anything is written there, `release` on
    every way out (a killed holder leaves a lock the rules above recognise as stale)."""

    def __init__(self, run_dir: Path, stale_after: float):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_after = stale_after
        self.holder = Holder.this_process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._releasing = threading.Lock()

    def acquire(self) -> None:
        for _ in range(5):  # each pass either creates the lock, refuses, or removes a stale one
            if self._create():
                self._start_heartbeat()
                _held.add(self)
                return
            inode = _inode(self.path)
            found = self._read()
            if inode is None or inode != _inode(self.path):
                continue  # released or replaced while we looked: look again
            reason = self._stale_reason(found)
            if reason is None:
                raise ConfigError([self._held_message(found)])
            if reason is not VANISHED and self._remove_stale(found, inode):
                log.warning(f"took over the stale lock {self.path} ({reason})")
        raise ConfigError(
            [f"could not take {self.path}: other starts keep racing for it; start one run only"]
        )

    def release(self) -> None:
        # The main thread's release and the watchdog's (before its os._exit) may overlap: the second
        # waits for the first to finish, and the lock leaves _held only once its file is gone, or the
        # watchdog could find nothing to release and exit while the main thread still joins the
        # heartbeat (a run.lock left behind; seen in CI).
        with self._releasing:
            if self not in _held:
                return
            self._stop.set()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
            found = self._read()
            if found is not None and found.token == self.holder.token:
                self.path.unlink(missing_ok=True)
            _held.discard(self)

    # ----- creating, reading, judging

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.holder), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self, path: Path | None = None) -> Holder | None:
        """The holder recorded in the lock file; None if there is none or it cannot be parsed (a
        holder killed while writing it, or a file that is not ours)."""
        try:
            data: Any = json.loads((path or self.path).read_text())
            return Holder(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _stale_reason(self, found: Holder | None) -> str | None:
        age = self._heartbeat_age()
        if age is None:
            return VANISHED  # released meanwhile: nothing to remove, try again
        if found is None:
            return f"unreadable and untouched for {age:.0f} s" if age > self.stale_after else None
        me = self.holder
        if found.host == me.host and _process_start(found.pid) != (found.pid_started or None):
            return f"its process {found.pid} on this host is gone"
        if found.job_id and found.job_id == me.job_id and found.restart_count < me.restart_count:
            return (
                f"SLURM job {found.job_id} was requeued (restart {found.restart_count} -> {me.restart_count})"
            )
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s, more than run.lock_stale_after={self.stale_after:g}"
        return None

    def _heartbeat_age(self) -> float | None:
        """Seconds since the lock's mtime, on the filesystem's clock (a probe file's mtime is its now)."""
        probe = self.path.with_name(f".{LOCK_FILE}.probe-{self.holder.token}")
        try:
            probe.write_bytes(b"")
            now = probe.stat().st_mtime
            return max(0.0, now - self.path.stat().st_mtime)
        except FileNotFoundError:
            return None
        finally:
            probe.unlink(missing_ok=True)

    def _remove_stale(self, judged: Holder | None, inode: tuple[int, int]) -> bool:
        """Rename the stale lock away; if what was renamed is not the file that was judged (another
        start took it over in between and wrote its own lock), put it back. The file is recognised by
        its inode, which also tells an unreadable lock from the new one that replaced it."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{self.holder.token}")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return False
        moved = self._read(aside)
        replaced = _inode(aside) != inode or (
            judged is not None and (moved is None or moved.token != judged.token)
        )
        if replaced:
            with suppress(OSError):  # back, unless a third start has created one since
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _held_message(self, found: Holder | None) -> str:
        who = found.describe() if found else "a process whose lock file cannot be read"
        return (
            f"run.dir {str(self.path.parent)!r} is in use by another run ({who}; lock {self.path}); nothing was "
            f"changed. Wait for it to finish, stop it, or use another run.dir. If you are sure no run uses it "
            f"(e.g. its node died), delete {self.path} or wait run.lock_stale_after="
            f"{self.stale_after:g} s after its last heartbeat"
        )

    # ----- the heartbeat

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            found = self._read()
            if found is None or found.token != self.holder.token:
                if not warned:
                    log.error(f"{self.path} is no longer this run's lock: another run may now write run.dir")
                    warned = True
                continue
            with suppress(OSError):  # a transient filesystem error: the next beat tries again
                os.utime(self.path)  # NULL times: NFS sets the server's time


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


@contextmanager
def run_dir_lock(run_dir: Path, stale_after: float, rank: int) -> Iterator[RunLock | None]:
    """Hold run.dir's lock (taken by rank 0; every rank learns whether it got it) while the block runs."""
    from pretrain.parallel.distributed import all_ranks_succeed

    lock = RunLock(run_dir, stale_after) if rank == 0 else None
    all_ranks_succeed(lambda: lock.acquire() if lock else None)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
