"""`optim.*`, `schedule.*` and `train.*`: the optimizer, the learning-rate schedule, and the batch, length,
precision and duration of training, with their checks (the batch against the world size is
`Config.world_size_problems`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from pretrain.config.checkpoint import CheckpointConfig
from pretrain.config.fields import choices, documented, one_of, positive

Schedule = Literal["cosine", "wsd", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
NonfinitePolicy = Literal["fail", "skip", "rollback"]
GradAccumDtype = Literal["fp32", "bf16"]
SCHEDULES: tuple[Schedule, ...] = choices(Schedule)
PRECISIONS: tuple[Precision, ...] = choices(Precision)
NONFINITE_POLICIES: tuple[NonfinitePolicy, ...] = choices(NonfinitePolicy)
GRAD_ACCUM_DTYPES: tuple[GradAccumDtype, ...] = choices(GradAccumDtype)


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = documented("Peak learning rate.", 3e-4)
    weight_decay: float = documented("Decoupled weight decay on matrices (not on norms or biases).", 0.1)
    beta1: float = documented("AdamW beta1.", 0.9)
    beta2: float = documented("AdamW beta2.", 0.95)
    eps: float = documented("AdamW epsilon.", 1e-8)
    grad_clip: float = documented("Clip the global gradient norm to this value; 0 disables clipping.", 1.0)

    def problems(self) -> list[str]:
        p = positive("optim.lr", self.lr)
        if self.weight_decay < 0:
            p.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                p.append(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        p += positive("optim.eps", self.eps)
        if self.grad_clip < 0:
            p.append(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        return p


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay, warmup-stable-decay, or constant."""

    kind: Schedule = documented("One of: cosine, wsd (warmup-stable-decay), constant.", "cosine")
    warmup_steps: int = documented("Steps of linear warmup from 0 to optim.lr.", 100)
    min_lr_ratio: float = documented("Final learning rate as a fraction of optim.lr.", 0.1)
    decay_fraction: float = documented(
        "wsd only: fraction of train.steps spent in the final linear decay.", 0.2
    )

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.kind not in SCHEDULES:
            close = difflib.get_close_matches(self.kind, SCHEDULES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            p.append(f"schedule.kind must be one of {', '.join(SCHEDULES)}, got {self.kind!r}{hint}")
        if self.warmup_steps < 0:
            p.append(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            p.append(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        return p

    def warnings(self, steps: int, lr: float) -> list[str]:
        """Schedules that do not fit in train.steps. Warned about, not refused: a smoke test shortens
        a preset's train.steps and keeps its warmup, and that run is still worth running; what it
        must not be is a surprise when its learning rate curve is not the one configured."""
        w = self.warmup_steps
        decay_start = steps - max(1, round(self.decay_fraction * steps))  # as optim.LRSchedule counts it
        # The longest warmup that leaves the curve its shape: the cosine decay needs two steps after it
        # (a one-step run has nothing to decay).
        limit = {"cosine": steps - 2 if steps > 1 else steps, "wsd": decay_start}.get(self.kind, steps)
        if w <= limit:
            return []
        fix = f"set schedule.warmup_steps <= {limit}" + (
            " or a smaller schedule.decay_fraction" if self.kind == "wsd" else ""
        )
        if w > steps:
            decay = "" if self.kind == "constant" else f" and the {self.kind} decay never starts"
            what = (
                f"is longer than train.steps ({steps}): the learning rate never reaches optim.lr ({lr:g}), it stops "
                f"at {lr * steps / w:.3g} ({steps / w:.0%} of it){decay}"
            )
        elif self.kind == "cosine":
            what = (
                f"leaves no steps of train.steps ({steps}) for the cosine decay: the run ends at optim.lr ({lr:g}), "
                f"not at schedule.min_lr_ratio x optim.lr"
            )
        else:
            what = (
                f"runs into the wsd decay, which starts at step {decay_start} (the last schedule.decay_fraction="
                f"{self.decay_fraction:g} of train.steps={steps}): the learning rate climbs to optim.lr ({lr:g}) "
                f"and then drops at once"
            )
        return [f"schedule.warmup_steps ({w}) {what}; {fix}"]


@dataclass
class TrainConfig:
    """Batch, length and duration of training."""

    steps: int = documented("Optimizer steps to train for.", 1000)
    global_batch_size: int = documented("Sequences per optimizer step, over all data-parallel ranks.", 32)
    micro_batch_size: int = documented("Sequences per forward/backward on one rank.", 4)
    grad_accum_steps: int | None = documented(
        "Micro-batches per step; null derives it as global_batch_size / (micro_batch_size x data-parallel size).",
        None,
    )
    seq_len: int = documented("Tokens per training sequence.", 1024)
    precision: Precision = documented(
        "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32.", "auto"
    )
    grad_accum_dtype: GradAccumDtype = documented(
        "bf16 training: the dtype gradients are summed over micro-batches and all-reduced in: fp32 (DeepSpeed's "
        "data_types.grad_accum_dtype and communication_data_type; 2x the gradient buffer and traffic) or bf16 "
        "(DeepSpeed's default; drifts with many micro-batches). fp32 runs are fp32 throughout; fp16 runs keep "
        "DeepSpeed's fp16 path.",
        "fp32",
    )
    compile: bool = documented(
        "Compile each decoder block with torch.compile (fused norms, rotary, SwiGLU and their backward; "
        "the same weights and checkpoints). Costs compile time at the first steps (about a minute on a GPU).",
        False,
    )
    eval_interval: int = documented("Compute validation loss every this many steps; 0 disables it.", 100)
    eval_batches: int = documented("Global batches of validation data per evaluation.", 4)
    on_nonfinite: NonfinitePolicy = documented(
        "When a step's gradient norm is not finite (its update is never applied): fail (stop, exit 3), skip "
        "(log the step and its sample ids, go on), or rollback (reload the newest complete checkpoint and skip "
        "the offending batches).",
        "fail",
    )
    max_nonfinite_events: int = documented(
        "With skip or rollback: stop (exit 3) after this many non-finite steps, so a diverged run ends.", 10
    )

    def problems(self) -> list[str]:
        """Impossible lengths, batches and intervals; the non-finite policy is `nonfinite_problems`."""
        p: list[str] = []
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
            p += positive(f"train.{name}", getattr(self, name))
        if self.grad_accum_steps is not None:
            p += positive("train.grad_accum_steps", self.grad_accum_steps)
        p += one_of("train.precision", self.precision, PRECISIONS)
        p += one_of("train.grad_accum_dtype", self.grad_accum_dtype, GRAD_ACCUM_DTYPES)
        if self.eval_interval < 0:
            p.append(f"train.eval_interval must be >= 0 (0 disables evaluation), got {self.eval_interval}")
        p += positive("train.eval_batches", self.eval_batches)
        if (
            self.global_batch_size > 0
            and self.micro_batch_size > 0
            and self.global_batch_size % self.micro_batch_size
        ):
            p.append(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return p

    def nonfinite_problems(self, checkpoint: CheckpointConfig) -> list[str]:
        """The non-finite policy, and whether the checkpoints it would roll back to are written."""
        p = one_of("train.on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if not p and self.on_nonfinite == "rollback" and checkpoint.interval == 0:
            p.append(
                "train.on_nonfinite=rollback needs periodic checkpoints to roll back to: set checkpoint.interval > 0"
            )
        p += positive("train.max_nonfinite_events", self.max_nonfinite_events)
        return p
