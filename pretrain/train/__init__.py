"""The training loop, its callbacks, and the builder that wires them up."""

from pretrain.errors import NonFiniteLossError
from pretrain.train.build import build_trainer, check_run_dir, run_summary
from pretrain.train.trainer import Trainer

__all__ = ["NonFiniteLossError", "Trainer", "build_trainer", "check_run_dir", "run_summary"]
