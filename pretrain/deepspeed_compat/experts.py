"""Expert parallelism through DeepSpeed's own machinery. Part of `pretrain.deepspeed_compat`, the one
place DeepSpeed's internals are used.

What DeepSpeed provides and we use as it is:
- the expert-parallel and expert-data-parallel process groups (`deepspeed.utils.groups`, named
  'ep_size_<ep>'), laid out over our pipe/data/model topology;
- its marker of an expert parameter (`allreduce = False`, `group_name`), which its engine reads to
  broadcast the initial weights and reduce gradients over the expert-data-parallel group only;
- MoE parameter groups (`moe: True`, `name`) for its ZeRO 1-2 and bf16 optimizers, which then
  partition expert optimizer state over the expert-data-parallel ranks and count each expert once in
  the global gradient norm.

What it lacks: its engine turns that machinery on (`has_moe_layers`) only when the model contains its
own `deepspeed.moe.layer.MoE` or AutoEP layers, whose routers have no z-loss, no capacity counting
and no per-sequence balancing loss, and whose parameter names are theirs. `expert_aware_engines`
makes `deepspeed.initialize` build engines that turn it on for our expert parameters, and save and
load checkpoints through DeepSpeed's ordinary path (each rank's ZeRO partition files hold its
experts' fp32 masters and Adam moments; see docs/MOE.md, 'Checkpoints').
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from pretrain.deepspeed_compat.errors import require as _require

EXPERT_PARAMETER_ATTRIBUTES = ("allreduce", "group_name")  # deepspeed.moe.utils.is_moe_param


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def create_expert_groups(ep: int, grid: Any) -> tuple[Any, Any]:
    """DeepSpeed's expert-parallel and expert-data-parallel groups of this rank for degree `ep`
    (collective over all ranks; created once per degree). `grid`: our PipelineParallelGrid, or None
    for pure data parallelism."""
    from deepspeed.utils import groups

    name = expert_group_name(ep)
    if name not in _require(groups, "_EXPERT_PARALLEL_GROUP", "DeepSpeed's expert groups"):
        if grid is None:
            _require(groups, "_create_expert_and_data_parallel", "creating expert groups")(ep)
        else:
            groups.mpu = grid  # the engine sets it too; its expert-group layout reads it
            _require(groups, "_create_expert_data_and_model_parallel", "creating expert groups")(ep, mpu=grid)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def mark_expert_parameter(param: torch.nn.Parameter, ep: int) -> None:
    """DeepSpeed's marker: not all-reduced over the data-parallel group, but over `ep`'s expert-data one."""
    param.allreduce = False  # type: ignore[attr-defined]
    param.group_name = expert_group_name(ep)  # type: ignore[attr-defined]


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    return getattr(param, "allreduce", True) is False and hasattr(param, "group_name")


def expert_parameter_group(params: list[torch.nn.Parameter], weight_decay: float) -> dict[str, Any]:
    """An optimizer parameter group of expert parameters in DeepSpeed's MoE form (`moe`, `name`:
    deepspeed.moe.utils.is_moe_param_group), which its ZeRO and bf16 optimizers partition over the
    group's expert-data-parallel ranks."""
    names = {p.group_name for p in params}  # type: ignore[attr-defined]
    assert len(names) == 1, f"expert parameters of several expert-parallel degrees: {sorted(names)}"
    return {"params": params, "weight_decay": weight_decay, "moe": True, "name": names.pop()}


def _expert_aware(base: type) -> type:
    class ExpertAwareEngine(base):
        """`base` with DeepSpeed's MoE paths on for parameters marked by `mark_expert_parameter`
        (every rank holds some: pretrain.parallel.layout refuses a pipeline stage without MoE blocks)."""

        def _configure_distributed_model(self, model: torch.nn.Module) -> None:
            super()._configure_distributed_model(model)
            self.has_moe_layers = True

        def save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
            with _ordinary_checkpoint_path(self):
                return super().save_checkpoint(*args, **kwargs)

        def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
            with _ordinary_checkpoint_path(self):
                return super().load_checkpoint(*args, **kwargs)

    ExpertAwareEngine.__name__ = f"ExpertAware{base.__name__}"
    return ExpertAwareEngine


@contextlib.contextmanager
def _ordinary_checkpoint_path(engine: Any) -> Iterator[None]:
    """DeepSpeed's MoE checkpoint path looks for its own MoE modules and writes per-expert files
    keyed by their names; ours keeps the experts in the ZeRO partition files, which its ordinary path
    writes and reads per data-parallel rank. The optimizer keeps its MoE settings."""
    saved = _require(engine, "has_moe_layers", "the engine's MoE switch")
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = saved


@contextlib.contextmanager
def expert_aware_engines(enabled: bool) -> Iterator[None]:
    """Within (when `enabled`: expert parallelism): `deepspeed.initialize` builds expert-aware
    versions of its engine and pipeline engine."""
    import deepspeed

    if not enabled:
        yield
        return
    names = ("DeepSpeedEngine", "PipelineEngine")
    saved = {
        name: _require(deepspeed, name, "the engine classes deepspeed.initialize builds") for name in names
    }
    try:
        for name, cls in saved.items():
            setattr(deepspeed, name, _expert_aware(cls))
        yield
    finally:
        for name, cls in saved.items():
            setattr(deepspeed, name, cls)
