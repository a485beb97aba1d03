"""Hang detection: when no step completes in time, every rank dumps its stacks and the job stops.

A daemon thread on every rank watches the time since the last completed step (`step_timeout`,
or `first_step_timeout` from the start of fit() to the end of the first step, which includes
compilation and warm-up; data and checkpoint loading come before fit() and are not watched). Collectives are what hang, so the ranks do not talk through them: they talk
through rank 0's rendezvous TCPStore (served by a thread of rank 0's process, so it answers while
rank 0's training thread is stuck), on their own connection:

- every rank publishes a heartbeat (last completed step, time, node) every few seconds;
- the first rank whose timer runs out raises the alarm; on the alarm every rank writes all its
  threads' Python stacks to run.dir/hang/<time>/rank-NNNNN.txt and posts a short report: its
  last step and where its training thread is, in a torch.distributed collective or elsewhere;
- the rank that raised the alarm writes run.dir/hang/<time>/report.txt, which names the ranks that
  are behind: those whose last completed step is older than the others', else those that are not
  inside a collective while others wait in one, and those that never answered (dead, or frozen
  without releasing the GIL); then every rank exits with EXIT_HANG.

If the store is gone (rank 0 died), each rank still writes its own stacks before exiting.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from pretrain.checkpoint.save_clock import SaveClock
from pretrain.errors import ExitCode
from pretrain.logs import EVERY_RANK, get_logger
from pretrain.train.callbacks.base import WATCH, Callback, TrainerView
from pretrain.train.run_lock import release_held_locks

log = get_logger(__name__)

EXIT_HANG = ExitCode.HANG
_COLLECTIVE_FILES = (
    os.sep + os.path.join("torch", "distributed") + os.sep,
    os.sep + os.path.join("deepspeed", "comm") + os.sep,
)
_LIBRARY_DIRS = (os.sep + "torch" + os.sep, os.sep + "deepspeed" + os.sep)


@dataclass
class Position:
    """Where a thread is: the collective it waits in (if any) and the innermost frame of our code."""

    collective: str | None
    where: str

    def describe(self) -> str:
        if self.collective:
            return f"waiting in {self.collective}, called from {self.where}"
        return f"not in a collective: at {self.where}"


def locate(frame: FrameType | None) -> Position:
    """Classify a thread's stack: the outermost torch.distributed / deepspeed.comm function it is in,
    and the innermost frame outside torch and DeepSpeed (the code that called into them)."""
    stack = traceback.extract_stack(frame) if frame is not None else []
    collective = None
    start = next((i for i, e in enumerate(stack) if any(p in e.filename for p in _COLLECTIVE_FILES)), None)
    if start is not None:
        # Named by torch.distributed's public function where there is one (deepspeed.comm wraps them).
        api = [e for e in stack[start:] if e.filename.endswith("distributed_c10d.py")]
        if api:
            collective = f"torch.distributed.{api[0].name}"
        else:
            module = "deepspeed.comm" if "deepspeed" in stack[start].filename else "torch.distributed"
            collective = f"{module}.{stack[start].name}"
        stack = stack[:start]
    ours = [e for e in stack if not any(part in e.filename for part in _LIBRARY_DIRS)]
    candidates = ours or stack
    where = "unknown"
    if candidates:
        entry = candidates[-1]
        where = f"{_short(entry.filename)}:{entry.lineno} in {entry.name}"
    return Position(collective, where)


def _short(filename: str) -> str:
    for marker in (
        os.sep + "site-packages" + os.sep,
        os.sep + "pretrain" + os.sep,
        os.sep + "tests" + os.sep,
    ):
        if marker in filename:
            head = "" if "site-packages" in marker else marker.strip(os.sep) + os.sep
            return head + filename.split(marker, 1)[1]
    return filename


def format_stacks() -> str:
    """Every thread's Python stack, main thread first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    main = threading.main_thread().ident
    order = sorted(frames, key=lambda ident: ident != main)
    parts = []
    for ident in order:
        if ident == threading.get_ident():
            continue  # the watchdog thread itself
        parts.append(
            f'Thread "{names.get(ident, "?")}" ({ident}):\n' + "".join(traceback.format_stack(frames[ident]))
        )
    return "\n".join(parts)


def _fit_running(code: Any) -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class Watchdog(Callback):
    """Runs last among the callbacks: a step counts as done after its evaluation and checkpoint."""

    priority = WATCH

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        node: str,
        step_timeout: float,
        first_step_timeout: float,
        store: Any = None,
        exit: Any = os._exit,
        saves: SaveClock | None = None,
        save_timeout: float = 0.0,
    ):
        self.run_dir, self.rank, self.world_size, self.node = Path(run_dir), rank, world_size, node
        self.step_timeout, self.first_step_timeout = step_timeout, first_step_timeout
        # The training thread's time in checkpoint saves is the saves' (save_timeout), not the step's.
        self.saves, self.save_timeout = saves, save_timeout if saves is not None else 0.0
        self._saving_at_last = 0.0
        self.store = store  # a TCPStore client of our own (clone of the rendezvous store), or None
        self._exit = exit
        self._step = 0
        self._last = time.monotonic()
        self._first_done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fit_code: Any = None
        deadlines = [t for t in (step_timeout, first_step_timeout, self.save_timeout) if t > 0]
        self.poll = min(5.0, max(0.05, min(deadlines) / 20)) if deadlines else 1.0

    @property
    def enabled(self) -> bool:
        return self.step_timeout > 0 or self.first_step_timeout > 0 or self.save_timeout > 0

    @classmethod
    def for_run(
        cls,
        cfg: Any,
        run_dir: Path,
        rank: int,
        world_size: int,
        saves: SaveClock | None = None,
        save_timeout: float = 0.0,
    ) -> Watchdog:
        """From config section `watchdog`, on the rendezvous store joined at launch (if any); the
        checkpoint saves' clock and deadline (checkpoint.save_timeout) if given."""
        from launch.rendezvous import current

        joined = current()
        store, node = None, os.uname().nodename
        if joined is not None:
            info, rendezvous = joined
            node = info.node
            try:
                store = rendezvous.clone()
            except Exception:
                store = None
        return cls(
            run_dir, rank, world_size, node, cfg.step_timeout, cfg.first_step_timeout, store,
            saves=saves, save_timeout=save_timeout,
        )  # fmt: skip

    # ----- callback hooks (training thread) -----

    def on_train_start(self, trainer: TrainerView) -> None:
        if not self.enabled:
            return
        from pretrain.train.trainer import Trainer as TrainerClass

        self._fit_code = TrainerClass.fit.__code__
        self._mark(trainer.state.step)
        self._thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)
        self._thread.start()

    def on_step_end(self, trainer: TrainerView) -> None:
        self._mark(trainer.state.step)
        self._first_done = True

    def _mark(self, step: int) -> None:
        now = time.monotonic()
        self._saving_at_last = self.saves.training_thread_seconds(now) if self.saves else 0.0
        self._step, self._last = step, now

    def on_train_end(self, trainer: TrainerView) -> None:
        self.stop()

    def on_abort(self, trainer: TrainerView) -> None:  # a stop signal's save, or an error, leaves fit()
        self.stop()

    def on_restore(self, trainer: TrainerView) -> None:  # a rollback: the loop goes on from an older step
        self._mark(trainer.state.step)

    def stop(self) -> None:
        self._stop.set()

    def on_close(self, trainer: TrainerView) -> None:
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, 2 * self.poll))

    # ----- the watchdog thread -----

    @property
    def timeout(self) -> float:
        return self.step_timeout if self._first_done else self.first_step_timeout

    def _store_call(self, method: str, *args: Any) -> Any:
        if self.store is None:
            return None
        try:
            return getattr(self.store, method)(*args)
        except Exception:
            self.store = None  # rank 0 (and its store) is gone; carry on with local dumps only
            return None

    def _run(self) -> None:
        last_beat = (-1, 0.0)
        while not self._stop.wait(self.poll):
            if self._fit_code is not None and not _fit_running(self._fit_code):
                return  # training left fit() (an error is on its way up): nothing to watch
            now = time.monotonic()
            if self._step != last_beat[0] or now - last_beat[1] > 10:
                beat = {"step": self._step, "time": time.time(), "node": self.node, "pid": os.getpid()}
                self._store_call("set", f"watchdog/beat/{self.rank}", json.dumps(beat))
                last_beat = (self._step, now)
            alarm = self._store_call("check", ["watchdog/alarm"])
            if alarm:
                self._on_alarm(json.loads(self._store_call("get", "watchdog/alarm") or b"{}"), reporter=False)
                return
            if (overdue := self.saves.overdue(self.save_timeout, now) if self.saves else None) is not None:
                self._raise_alarm(overdue[1], save_step=overdue[0])
                return
            stalled = self.stalled(now)
            if self.timeout > 0 and stalled > self.timeout:
                self._raise_alarm(stalled)
                return

    def stalled(self, now: float) -> float:
        """Seconds since the last completed step, less the training thread's time in saves since."""
        saving = self.saves.training_thread_seconds(now) - self._saving_at_last if self.saves else 0.0
        return now - self._last - saving

    def _raise_alarm(self, stalled: float, save_step: int | None = None) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        directory = self.run_dir / "hang" / stamp
        key = "step_timeout" if self._first_done else "first_step_timeout"
        alarm = {
            "dir": str(directory),
            "by": self.rank,
            "step": self._step,
            "exit": int(EXIT_HANG),
            "headline": f"hang: no training step completed for {stalled:.1f} s on rank {self.rank} "
            f"(watchdog.{key}={self.timeout:g}; time in checkpoint saves not counted); stacks of every "
            f"rank in {directory}",
        }
        if save_step is not None:
            alarm["exit"] = int(ExitCode.CHECKPOINT)
            alarm["headline"] = (
                f"checkpoint save timeout: the save of step {save_step} has taken {stalled:.1f} s on rank "
                f"{self.rank}, more than checkpoint.save_timeout={self.save_timeout:g} (a slow or hung "
                f"filesystem?); its checkpoint is not complete and earlier ones are untouched. Stacks of "
                f"every rank (the checkpoint-writer thread's show where it waits) in {directory}"
            )
        first = self._store_call("add", "watchdog/alarms", 1)
        if first is not None and first > 1:  # another rank raised it first; follow its alarm
            for _ in range(100):
                if self._store_call("check", ["watchdog/alarm"]):
                    self._on_alarm(json.loads(self._store_call("get", "watchdog/alarm")), reporter=False)
                    return
                time.sleep(0.05)
        self._store_call("set", "watchdog/alarm", json.dumps(alarm))
        self._on_alarm(alarm, reporter=True)

    def _on_alarm(self, alarm: dict[str, Any], reporter: bool) -> None:
        # Once a rank exits, a peer waiting in a collective with it gets a connection error: its
        # training thread then fails and the process would exit with 1 while this thread still works.
        atexit.register(self._finish_alarm)
        directory = Path(alarm.get("dir") or self.run_dir / "hang" / "unknown")
        directory.mkdir(parents=True, exist_ok=True)
        main = sys._current_frames().get(threading.main_thread().ident or -1)
        position = locate(main)
        stack_file = directory / f"rank-{self.rank:05d}.txt"
        stack_file.write_text(
            f"rank {self.rank} on {self.node} (pid {os.getpid()}), last completed step {self._step}, "
            f"{time.monotonic() - self._last:.1f} s ago; training thread {position.describe()}\n\n{format_stacks()}"
        )
        report = {
            "rank": self.rank,
            "node": self.node,
            "pid": os.getpid(),
            "step": self._step,
            "collective": position.collective,
            "where": position.where,
            "stacks": str(stack_file),
        }
        self._store_call("set", f"watchdog/report/{self.rank}", json.dumps(report))
        grace = max(10.0, 4 * self.poll)
        if reporter:
            text = self._report(alarm, directory, grace)
            (directory / "report.txt").write_text(text + "\n")
            log.error(text, extra=EVERY_RANK)
            self._store_call("set", "watchdog/reported", str(directory / "report.txt"))
        else:
            deadline = time.monotonic() + 3 * grace
            while time.monotonic() < deadline and self.store is not None:
                if self._store_call("check", ["watchdog/reported"]):
                    break
                time.sleep(0.1)
            if self.store is None:
                log.error(
                    f"rank {self.rank} on {self.node}: no step completed in time and rank 0's store is "
                    f"unreachable (rank 0 died?); stacks in {stack_file}",
                    extra=EVERY_RANK,
                )
        sys.stdout.flush()
        sys.stderr.flush()
        release_held_locks()  # os._exit skips every finally: the rerun must not find run.dir locked
        self._exit(int(alarm.get("exit", EXIT_HANG)))

    def _finish_alarm(self) -> None:
        """At interpreter exit: let this thread finish the dump and exit with EXIT_HANG itself."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _report(self, alarm: dict[str, Any], directory: Path, grace: float) -> str:
        """Wait up to `grace` seconds for every rank's report, then name the ranks that are behind."""
        reports: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + grace
        while True:
            for r in range(self.world_size):
                if r not in reports and self._store_call("check", [f"watchdog/report/{r}"]):
                    reports[r] = json.loads(self._store_call("get", f"watchdog/report/{r}"))
            if len(reports) == self.world_size or time.monotonic() > deadline or self.store is None:
                break
            time.sleep(0.1)
        if self.store is None and self.rank not in reports:
            reports[self.rank] = {
                "rank": self.rank,
                "node": self.node,
                "step": self._step,
                "collective": None,
            }
        silent = [r for r in range(self.world_size) if r not in reports]
        beats = {}
        for r in silent:
            known = self._store_call("check", [f"watchdog/beat/{r}"])
            raw = self._store_call("get", f"watchdog/beat/{r}") if known else None
            beats[r] = json.loads(raw) if raw else None
        behind, reason = behind_ranks(reports)
        from launch.rendezvous import ranges

        lines = [str(alarm["headline"])]
        if behind:
            lines.append(f"behind: rank{'s' * (len(behind) > 1)} {ranges(behind)} ({reason})")
        elif not silent:
            lines.append(f"behind: could not tell ({reason}); compare the stacks")
        if silent:
            lines.append(
                f"no answer from rank{'s' * (len(silent) > 1)} {ranges(silent)} (dead, or frozen holding the GIL): "
                + "; ".join(
                    f"rank {r} last seen on {b['node']} at step {b['step']}"
                    if b
                    else f"rank {r} never sent a heartbeat"
                    for r, b in beats.items()
                )
            )
        for r in sorted(reports):
            rep = reports[r]
            place = (
                f"waiting in {rep['collective']}, called from {rep.get('where')}"
                if rep.get("collective")
                else f"at {rep.get('where')}"
            )
            lines.append(f"  rank {r} on {rep.get('node')}: last completed step {rep['step']}, {place}")
            if len(lines) > 40:
                lines.append(f"  ... {len(reports) - r - 1} more ranks in {directory}")
                break
        return "\n".join(lines)


def behind_ranks(reports: dict[int, dict[str, Any]]) -> tuple[list[int], str]:
    """The ranks holding the others up, and why we think so."""
    if not reports:
        return [], "no rank answered"
    newest = max(rep["step"] for rep in reports.values())
    older = [r for r, rep in reports.items() if rep["step"] < newest]
    if older:
        return sorted(older), f"their last completed step is older than step {newest} of the others"
    waiting = [r for r, rep in reports.items() if rep.get("collective")]
    outside = [r for r, rep in reports.items() if not rep.get("collective")]
    if waiting and outside:
        return sorted(outside), "not inside a collective while the others wait in one"
    if waiting:
        kinds = {rep["collective"] for rep in reports.values()}
        if len(kinds) > 1:
            return [], f"every rank is inside a collective, but not the same one: {', '.join(sorted(kinds))}"
        return [], f"every rank waits in {kinds.pop()} at the same step"
    return [], "no rank is in a collective"
