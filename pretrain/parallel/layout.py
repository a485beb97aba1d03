"""The layout checks that need the model: whether its layers split into `parallel.pp` pipeline stages.

pretrain.config checks everything that is arithmetic on the config (degrees, world size, batches)
without importing the model; the entry points call these after `load_config`, on a config that
passed those checks.
"""

from __future__ import annotations

from pretrain.config import Config, ConfigError
from pretrain.parallel.partition import partition_layers


def layout_problems(cfg: Config, world_size: int) -> list[str]:
    """Why `cfg` cannot be laid out on `world_size` ranks beyond what pretrain.config checks; [] with
    a single pipeline stage. Expects a config that passed `validate(cfg, world_size)`. (No check here
    depends on `world_size` yet; callers pass it so they need not know which checks do.)"""
    if cfg.parallel.pp <= 1:
        return []
    try:
        partition_layers(cfg)
    except ConfigError as e:
        return e.problems
    return []


def check_layout(cfg: Config, world_size: int) -> None:
    """Raise `ConfigError` with `layout_problems(cfg, world_size)`, if there are any."""
    if problems := layout_problems(cfg, world_size):
        raise ConfigError(problems)
