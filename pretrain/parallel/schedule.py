"""Learning-rate schedules as a plain callable for `torch.optim.lr_scheduler.LambdaLR`.

`LambdaLR.state_dict()` stores the callable's attributes, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math

from pretrain.config import ScheduleConfig


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
