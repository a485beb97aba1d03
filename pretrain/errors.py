"""The framework's errors and the exit codes they carry, defined once for every entry point.

Every error raised on purpose derives from `PretrainError`, whose class says the process's exit code
and who reports it. `pretrain/main.py` maps them in one place: it prints `error.report(rank)` and exits
with `error.exit_code`. This module imports nothing of the framework (and no torch), so every layer,
`launch/` included, can raise these.

    PretrainError                 1  an operation was refused (conversion, planning, preparing data)
    ├── ConfigError               2  invalid configuration; nothing was started or changed
    │   └── OutOfMemory              the model and batch do not fit in a rank's memory at these settings
    ├── NonFiniteLossError        3  the loss became non-finite
    ├── DataError                 4  unusable data (missing, corrupt, mismatched)
    ├── CheckpointError           5  a checkpoint or the run's outputs could not be written or read back
    │   ├── InvalidCheckpoint        a folder that is not a complete, intact checkpoint
    │   └── OutputError              run.dir (metrics, run files) could not be written
    ├── LaunchError               7  the launch failed (environment, rendezvous, pre-flight)
    ├── ConversionError           1  a checkpoint or model folder that cannot be converted as asked
    ├── PeerFailure                  another rank failed: this one exits with that rank's code
    └── Preempted                75  stopped by a signal after saving a complete checkpoint
    (6, a hang, is not an exception: the watchdog thread exits the process with ExitCode.HANG.)
"""

from __future__ import annotations

import errno
from enum import IntEnum
from pathlib import Path
from typing import ClassVar


class ExitCode(IntEnum):
    OK = 0
    REFUSED = 1
    CONFIG = 2
    NON_FINITE = 3
    DATA = 4
    CHECKPOINT = 5
    HANG = 6
    LAUNCH = 7
    # A collective failed because another rank went away: the cause is that rank's (its own code, or
    # a signal), or the network's when every rank says this (the SLURM script requeues then).
    PEER_LOST = 8
    # EX_TEMPFAIL in sysexits.h: a temporary failure, try again later (the SLURM script requeues).
    REQUEUE = 75


class PretrainError(Exception):
    """Base of every error the framework raises on purpose; the message names the problem and the fix."""

    exit_code: ClassVar[ExitCode] = ExitCode.REFUSED

    def report(self, rank: int) -> str | None:
        """The line to print on `rank`, or None. By default the error is the same on every rank
        (the ranks agreed on it), so rank 0 alone reports it."""
        return f"error: {self}" if rank == 0 else None


class ConfigError(PretrainError, ValueError):
    """Every problem found in a configuration, one per line."""

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}"
        )


class OutOfMemory(ConfigError):
    """A rank ran out of memory building or training the model: what fixes it is a config change, so it
    is a ConfigError. Only that rank may have seen it, so it reports itself."""

    def __init__(self, rank: int, where: str, error: BaseException, settings: str):
        self.rank, self.error = rank, error
        super().__init__(
            [
                f"out of memory on rank {rank} while {where} ({type(error).__name__}: {error}). At {settings} the "
                f"model and batch do not fit: lower train.micro_batch_size (gradient accumulation keeps "
                f"train.global_batch_size), recompute activations (parallel.activation_checkpointing=full or "
                f"selective), shorten train.seq_len, or spread the model over more ranks (parallel.zero_stage=3, "
                f"parallel.tp, parallel.pp); `python -m pretrain.plan --config ...` estimates the memory per "
                f"device of a layout before launching it"
            ]
        )

    def report(self, rank: int) -> str | None:
        return f"error (rank {rank}): {self}"


class NonFiniteLossError(PretrainError, RuntimeError):
    """A non-finite loss or gradient norm stopped the run; `quantity` names which one, `fixes` says
    what to change (see `nonfinite_fixes`)."""

    exit_code = ExitCode.NON_FINITE

    def __init__(
        self,
        step: int,
        value: float,
        detail: str = "",
        *,
        quantity: str = "the training loss",
        fixes: str = "",
    ):
        self.step, self.value = step, value
        super().__init__(
            f"{quantity} became {value} at step {step}{detail}; stopping before anything is saved from it. "
            f"{fixes or nonfinite_fixes('fail')}"
        )


def nonfinite_fixes(policy: str, *, exhausted: bool = False, unverified_resume: str | None = None) -> str:
    """What to change after a non-finite step under train.on_nonfinite=`policy`; `exhausted`: the
    run met more than train.max_nonfinite_events."""
    fixes = "Lower optim.lr, raise schedule.warmup_steps, set optim.grad_clip, use train.precision=bf16 instead of fp16"
    if policy == "fail":
        fixes += ", or set train.on_nonfinite=skip|rollback to go on past a bad batch"
    elif exhausted:
        fixes += (
            f" (train.on_nonfinite={policy} kept it going, but steps kept failing: the run has likely diverged; "
            f"raise train.max_nonfinite_events only if you know the data holds that many bad batches)"
        )
    return with_unverified_resume(fixes, unverified_resume)


def with_unverified_resume(fixes: str, folder: str | None) -> str:
    """`fixes`, led by a word on the checkpoint `folder` this process resumed from without reading its
    checksums (checkpoint.verify=size): a corrupt one (e.g. its optimizer state) fails exactly so."""
    if not folder:
        return fixes
    return (
        f"This process resumed from {folder} with checkpoint.verify=size, which does not read the files' "
        f"checksums, and a corrupt checkpoint fails exactly like this: rerun with checkpoint.verify=checksum "
        f"first. If that passes: {fixes}"
    )


class DataError(PretrainError, ValueError):
    """Data that cannot be trained on; the message names the dataset or file and the fix."""

    exit_code = ExitCode.DATA

    def report(self, rank: int) -> str | None:
        return f"error (rank {rank}): {self}"  # possibly the only rank that saw it


class CheckpointError(PretrainError, RuntimeError):
    """A checkpoint cannot be written or resumed as asked; the message names the problem and the fix."""

    exit_code = ExitCode.CHECKPOINT


class InvalidCheckpoint(CheckpointError):
    """A folder that is not a complete, intact checkpoint."""

    def __init__(self, folder: Path, reason: str):
        self.folder, self.reason = folder, reason
        super().__init__(f"{folder} is not a complete checkpoint: {reason}")


class OutputError(CheckpointError):
    """The run directory's outputs (metrics, TensorBoard events, run files) could not be written."""

    def __init__(self, what: str, error: OSError):
        self.error = error
        hint = (
            "free space there or move run.dir to a larger filesystem"
            if error.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check that run.dir is writable by this user on every node"
        )
        super().__init__(
            f"cannot write {what}: {error}; {hint}, then rerun the same command (it resumes from the newest "
            f"complete checkpoint)"
        )

    def report(self, rank: int) -> str | None:
        return f"error (rank {rank}): {self}"


class LaunchError(PretrainError, RuntimeError):
    """The launch environment is inconsistent or unusable; the message names the problem and the fix."""

    exit_code = ExitCode.LAUNCH

    def report(self, rank: int) -> str | None:
        return f"error: {self}"  # before the ranks can agree on anything: every rank says what it saw


class ConversionError(PretrainError):
    """A checkpoint or model folder that cannot be converted as asked; the message names the file and the fix."""


class PeerFailure(PretrainError, RuntimeError):
    """Raised on ranks that succeeded when another rank failed the same collective step; they exit
    with the failed rank's code, and only the failed rank reports."""

    def __init__(self, exit_code: int):
        super().__init__("another rank failed (its error is printed by that rank); stopping here too")
        self.peer_exit_code = exit_code

    def report(self, rank: int) -> str | None:
        return None


class Preempted(PretrainError):
    """All ranks stopped after a stop signal, with a complete checkpoint of the last step on disk."""

    exit_code = ExitCode.REQUEUE

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = (
            f"checkpoint {checkpoint}"
            if checkpoint
            else "the newest checkpoint on disk (nothing trained since)"
        )
        super().__init__(
            f"stopped by {signal_name} after step {step}; {where} is complete. Run the same command again to "
            f"continue (exit code {ExitCode.REQUEUE.value})"
        )

    def report(self, rank: int) -> str | None:
        return str(self) if rank == 0 else None


def exit_code_of(error: BaseException) -> int:
    """The exit code a process ends with after `error` (1 for anything not raised on purpose)."""
    if isinstance(error, PeerFailure):
        return error.peer_exit_code
    if isinstance(error, PretrainError):
        return int(error.exit_code)
    return int(ExitCode.REFUSED)
