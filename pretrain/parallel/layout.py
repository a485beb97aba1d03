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
        parts = partition_layers(cfg)
    except ConfigError as e:
        return e.problems
    return _stages_without_experts(cfg, parts)


def _stages_without_experts(cfg: Config, parts: list[int]) -> list[str]:
    """Under expert parallelism every pipeline stage needs an MoE block: DeepSpeed's ZeRO reduces
    each optimizer group's gradient norm over the stages in turn, and a stage without experts has one
    group fewer (the collectives would not line up)."""
    if cfg.parallel.ep <= 1:
        return []
    model = cfg.model
    empty = [
        stage
        for stage in range(cfg.parallel.pp)
        if not any(
            1 <= i <= model.num_layers and model.is_moe_block(i - 1)
            for i in range(parts[stage], parts[stage + 1])
        )
    ]
    if not empty:
        return []
    return [
        f"with parallel.ep={cfg.parallel.ep}, every pipeline stage needs a mixture-of-experts block, but stage(s) "
        f"{', '.join(map(str, empty))} hold only dense blocks (model.moe.first_dense_layers="
        f"{model.moe.first_dense_layers}, stage boundaries {parts} in the layer list); use fewer dense blocks, "
        f"fewer stages, or parallel.ep=1"
    ]


def check_layout(cfg: Config, world_size: int) -> None:
    """Raise `ConfigError` with `layout_problems(cfg, world_size)`, if there are any."""
    if problems := layout_problems(cfg, world_size):
        raise ConfigError(problems)
