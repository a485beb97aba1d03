"""The optimizer and its schedule: AdamW with decoupled weight decay on matrices, and the learning
rate (warmup, then cosine, warmup-stable-decay or constant) as a function of the optimizer step."""

from pretrain.optim.optimizer import apply_hyperparameters, build_optimizer, parameter_groups
from pretrain.optim.schedule import LRSchedule, LRScheduler

__all__ = ["LRSchedule", "LRScheduler", "apply_hyperparameters", "build_optimizer", "parameter_groups"]
