"""`checkpoint.*`: when checkpoints are written and kept, what a resume checks and may differ in, and where
the weights start from; with the settings a resume guards (`RESUME_GUARDED_KEYS`) and the checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.fields import choices, documented, one_of

ResumeVerification = Literal["checksum", "size"]
RESUME_VERIFICATION: tuple[ResumeVerification, ...] = choices(ResumeVerification)
# Settings a resumed run must share with its checkpoint, unless listed in checkpoint.allow_changes:
# each changes which tokens the following steps train on. Model shapes can never change (the weights
# would not fit); everything else (LR, schedule, steps, layout, logging) may change freely.
RESUME_GUARDED_KEYS = (
    "train.global_batch_size",
    "train.seq_len",
    "data.paths",
    "data.weights",
    "data.validation_fraction",
    "seed",
)


@dataclass
class CheckpointConfig:
    """When to write checkpoints into run.dir/checkpoints, how many to keep, and where to resume from."""

    interval: int = documented("Save every this many steps; 0 saves only at the end (if save_final).", 500)
    save_final: bool = documented("Save when training finishes.", True)
    resume: str = documented(
        "auto: continue from the newest complete checkpoint in run.dir/checkpoints (a fresh start if there is "
        "none); none: start fresh (refused if run.dir already holds a run, unless run.overwrite); or a path: that "
        "checkpoint (a step folder), or the newest complete one in that run or checkpoints folder. A different "
        "layout (DP, TP, PP, ZeRO stage) is resharded automatically, optimizer state included.",
        "auto",
    )
    keep_last: int = documented(
        "Keep the newest this many complete checkpoints and delete older ones after each save; 0 keeps all. "
        "The newest complete checkpoint is never deleted.",
        3,
    )
    keep_every: int = documented(
        "Also keep, permanently, every checkpoint whose step is a multiple of this; 0: none.", 0
    )
    async_save: bool = documented(
        "Write checkpoints in a background thread: training pauses only while the state is copied to host "
        "memory (one save in flight at a time, so host memory holds at most one extra copy of the state).",
        True,
    )
    verify: ResumeVerification = documented(
        "What resuming checks before it trusts a checkpoint: checksum (every file against the manifest's "
        "checksum, the reading spread over all ranks) or size (file sizes only; for huge checkpoints).",
        "checksum",
    )
    allow_changes: list[str] = documented(
        "Settings allowed to differ from the checkpoint's when resuming, among: "
        + ", ".join(RESUME_GUARDED_KEYS)
        + " (each changes which data the following steps see; a difference not listed here stops the resume).",
        default_factory=list,
    )
    init_weights: str | None = documented(
        "Start from these weights instead of the seeded init: consolidated safetensors written by `python -m "
        "pretrain.convert from-hf` (its folder) or `to-fp32` (the file). Weights only: optimizer, LR schedule and "
        "data start fresh. Any layout; model.* must describe the same architecture (checked, with the fix).",
        None,
    )
    save_timeout: float = documented(
        "Seconds a checkpoint save may take, from its start to its commit on every rank (a preemption save of "
        "a large model on a slow filesystem included); the time training waits for a save does not count "
        "against watchdog.step_timeout. Past it every rank writes its stacks to run.dir/hang/<time>/ and the "
        "job exits with code 5, naming the save. 0 disables.",
        3600.0,
    )

    # The checks come in two parts only to keep the order users have always seen them in: the
    # non-finite policy's checks (`TrainConfig.nonfinite_problems`) are reported between the two.

    def resume_and_retention_problems(self) -> list[str]:
        """checkpoint.resume, keep_last, keep_every, verify and allow_changes."""
        p: list[str] = []
        if not self.resume.strip():
            p.append("checkpoint.resume must be auto, none or a checkpoint path; got an empty string")
        if self.keep_last < 0:
            p.append(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        if self.keep_every < 0:
            p.append(f"checkpoint.keep_every must be >= 0 (0: none), got {self.keep_every}")
        p += one_of("checkpoint.verify", self.verify, RESUME_VERIFICATION)
        for key in self.allow_changes:
            if key not in RESUME_GUARDED_KEYS:
                hint = (
                    "model settings can never change on resume (the weights would not fit)"
                    if key.startswith("model.")
                    else f"only these need it: {', '.join(RESUME_GUARDED_KEYS)}; other settings may change freely"
                )
                p.append(f"checkpoint.allow_changes lists {key!r}: {hint}")
        return p

    def init_weights_and_interval_problems(self) -> list[str]:
        """checkpoint.init_weights and interval."""
        p: list[str] = []
        if self.init_weights is not None and not self.init_weights.strip():
            p.append(
                "checkpoint.init_weights must be a path, or null for the seeded init; got an empty string"
            )
        if self.interval < 0:
            p.append(f"checkpoint.interval must be >= 0 (0 saves only at the end), got {self.interval}")
        if self.save_timeout < 0:
            p.append(f"checkpoint.save_timeout must be >= 0 seconds (0 disables it), got {self.save_timeout}")
        return p
