"""The learning rate as a function of the optimizer step.

`LRSchedule` is the curve (a multiplier of the peak LR); `LRScheduler` applies it to an optimizer
and is what DeepSpeed steps. Its only state is its position: on resume the curve's shape (peak LR,
warmup, decay, total steps) and the other optimizer settings come from the current config.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pretrain.config import OptimConfig, ScheduleConfig
from pretrain.optim.optimizer import apply_hyperparameters


class LRSchedule:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warmup that reaches 1 at
    step warmup_steps - 1, then cosine to min_lr_ratio at the last step, warmup-stable-decay
    (linear decay over the final decay_fraction of training), or constant."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int):
        self.kind = cfg.kind
        self.warmup_steps = cfg.warmup_steps
        self.min_lr_ratio = cfg.min_lr_ratio
        self.total_steps = total_steps
        self.decay_steps = max(1, round(cfg.decay_fraction * total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_start = self.total_steps - self.decay_steps
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / self.decay_steps)
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRScheduler:
    """Sets the optimizer's learning rate to optim.lr x LRSchedule(step) for optimizer step `step`.

    DeepSpeed calls `step()` after every applied update (a skipped, non-finite step does not advance
    it) and saves `state_dict()` in its own checkpoint files; the checkpoint's `lr_schedule` part is
    the same dict. Not callable on purpose: DeepSpeed would take a callable for a factory."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, optim: OptimConfig, schedule: ScheduleConfig, steps: int
    ):
        self.optimizer, self.optim = optimizer, optim
        self.curve = LRSchedule(schedule, steps)
        self.position = 0  # optimizer updates applied so far
        self._apply()

    def step(self) -> None:
        self.position += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints written before this class held torch's LambdaLR state: its last_epoch is the position.
        self.position = int(state["position"] if "position" in state else state["last_epoch"])
        apply_hyperparameters(self.optimizer.param_groups, self.optim)
        self._apply()

    def _apply(self) -> None:
        lr = self.optim.lr * self.curve(self.position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
