"""The run directory: refusing to mix runs, starting over, and continuing a resumed run's records."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import Config
from pretrain.errors import ConfigError

RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "checkpoints", "metrics.png")
# What a start writes in run.dir before its first step is done: the pre-flight record, the checkpoint
# folder (the shared-storage check), the run files, and the sinks the training loop opens at its start.
START_OUTPUTS = (
    "launch.json", "checkpoints", "config.yaml", "deepspeed_config.json", "run_summary.json", "metrics.jsonl",
    "tensorboard",
)  # fmt: skip


def existing_run_outputs(run_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def check_run_dir(cfg: Config) -> None:
    """Refuse to mix a new run into a directory that already holds another one.

    With checkpoint.resume=auto a run directory holding a run is continued, never clobbered; with
    resume=none, or a checkpoint of another run, it must be empty unless run.overwrite=true."""
    run_dir = Path(cfg.run.dir)
    _check_writable(run_dir)
    found = existing_run_outputs(run_dir)
    if not found or cfg.run.overwrite or cfg.checkpoint.resume == "auto":
        return
    resume = cfg.checkpoint.resume
    if resume != "none" and _inside(Path(resume), run_dir):
        return  # an earlier checkpoint of this same run
    why = (
        "checkpoint.resume=none" if resume == "none" else f"checkpoint.resume={resume} belongs to another run"
    )
    raise ConfigError(
        [
            f"run.dir {cfg.run.dir!r} already holds a run ({', '.join(found)}) and {why}; nothing was changed. "
            f"Use checkpoint.resume=auto to continue it, choose a new run.dir, or pass run.overwrite=true to delete "
            f"those and start fresh"
        ]
    )


@dataclass(frozen=True)
class RunDirBefore:
    """run.dir as a start found it, so that a start refused before its first step is done leaves it so."""

    run_dir: Path
    created: tuple[Path, ...]  # run.dir and the parents of it that did not exist, deepest first
    entries: frozenset[str]
    launch_record: bytes | None  # launch.json, which the pre-flight check rewrites as soon as it passes

    @classmethod
    def take(cls, run_dir: Path) -> RunDirBefore:
        created = tuple(p for p in (run_dir, *run_dir.parents) if not p.exists())
        try:
            entries = frozenset(os.listdir(run_dir)) if not created else frozenset()
            launch = run_dir / "launch.json"
            record = launch.read_bytes() if launch.is_file() else None
        except OSError:  # unreadable: check_run_dir says why; nothing here is ever removed then
            return cls(run_dir, (), frozenset(RUN_OUTPUTS + START_OUTPUTS), None)
        return cls(run_dir, created, entries, record)

    def restore(self, outputs: bool = True) -> None:
        """Remove what this start created (never anything that was there before, nor a folder that
        is not empty) and put back the launch.json it replaced; best effort, the refusal is the error.
        `outputs=False`: only the folders it created, where run.dir's lock was never this start's (what
        appeared there since may be another live run's)."""
        if outputs:
            self.restore_outputs()
        self.remove_created_folders()

    def restore_outputs(self) -> None:
        """The files a start writes: call while holding run.dir's lock."""
        for name in (n for n in START_OUTPUTS if n not in self.entries):
            target = self.run_dir / name
            with contextlib.suppress(OSError):
                if name == "tensorboard":
                    shutil.rmtree(target)  # made by this start: its event files, of no step
                elif target.is_dir():
                    target.rmdir()  # checkpoints/ only if empty: a checkpoint is never removed here
                elif target.exists():
                    target.unlink()
        if self.launch_record is not None:
            with contextlib.suppress(OSError):
                (self.run_dir / "launch.json").write_bytes(self.launch_record)

    def remove_created_folders(self) -> None:
        """run.dir and its parents where this start created them and they are empty (after the lock file
        has gone with the lock)."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or gone): neither it nor its parents were only ours


def _check_writable(run_dir: Path) -> None:
    """run.dir must exist (it is created here) and be writable, before anything starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable by this user", str(run_dir))
    except OSError as e:
        raise ConfigError(
            [
                f"run.dir {str(run_dir)!r} cannot be used ({e}); choose a run.dir on a filesystem this user can write to"
            ]
        ) from e


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def clear_run_outputs(run_dir: Path) -> None:
    """run.overwrite=true: delete what an earlier run wrote (rank 0, before anything reads it)."""
    for name in existing_run_outputs(run_dir):
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def write_run_files(run_dir: Path, cfg: Config, summary: dict[str, Any], ds_config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to `step` (the resumed checkpoint's): what came after it was
    trained again, and metrics.jsonl reads as one run. Event records (a non-finite step, a rollback)
    are kept whatever their step: they are the run's log of what happened, which only grows.
    Returns how many records were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the process was killed
            dropped += 1
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= step or "event" in record:
            kept.append(line)
        else:
            dropped += 1
    path.write_text("".join(f"{line}\n" for line in kept))
    return dropped
