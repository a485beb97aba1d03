"""Every use of DeepSpeed's internals, in one place.

The framework drives DeepSpeed through its public API (`deepspeed.initialize`, `save_checkpoint`,
`load_checkpoint`, `train_batch`, `safe_set_full_*`) and, where that API stops short, through the
private attributes, private methods and on-disk layouts below. Each is named here once and checked
by `tests/test_deepspeed_compat.py` against the installed DeepSpeed, so a release that changes one
fails at this module, with `DeepSpeedIncompatible` naming the internal that moved, instead of deep
inside a resume at 3 a.m. `TESTED_DEEPSPEED` is the range `pyproject.toml` pins.

Sections: the engine (checkpoint engine, counters, the wrapped torch optimizer); parameter markers;
the pipeline's stage boundaries; the checkpoint files (names, keys, the classes DeepSpeed pickles).
Submodules, re-exported here: `experts` (expert parallelism on DeepSpeed's expert groups, markers
and MoE optimizer groups), `resharding` (writing full tensors or only this rank's fragment of fp32
masters, moments and ZeRO-3 shards into a live engine), `shm` (the CPU accelerator's shared-memory
buffers), `errors` (`DeepSpeedIncompatible`, the tested range).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pretrain.deepspeed_compat.errors import TESTED_DEEPSPEED, DeepSpeedIncompatible
from pretrain.deepspeed_compat.errors import require as _require
from pretrain.deepspeed_compat.experts import (
    create_expert_groups,
    expert_aware_engines,
    expert_group_name,
    expert_parameter_group,
    is_expert_parameter,
    mark_expert_parameter,
)
from pretrain.deepspeed_compat.resharding import (  # one namespace for callers
    FLAT_PARTITION_ATTRIBUTES,
    Zero3Partitioned,
    create_optimizer_state,
    fragment_range,
    optimizer_sharding,
    set_full_state,
    set_local_state,
    zero3_partition,
)
from pretrain.deepspeed_compat.shm import (
    remove_orphaned_shm_buffers,
    shm_allreduce_buffer,
    unlink_shm_allreduce_buffer,
)

__all__ = [
    "FLAT_PARTITION_ATTRIBUTES",
    "TESTED_DEEPSPEED",
    "CheckpointEngine",
    "DeepSpeedIncompatible",
    "PresetPartitionPipeline",
    "Zero3Partitioned",
    "create_expert_groups",
    "create_optimizer_state",
    "expert_aware_engines",
    "expert_group_name",
    "expert_parameter_group",
    "fragment_range",
    "is_expert_parameter",
    "mark_expert_parameter",
    "optimizer_sharding",
    "remove_orphaned_shm_buffers",
    "set_full_state",
    "set_local_state",
    "shm_allreduce_buffer",
    "unlink_shm_allreduce_buffer",
    "zero3_partition",
]


def version_warning() -> str | None:
    """A warning when the installed DeepSpeed is outside the tested range (it may still work)."""
    import deepspeed
    from packaging.version import Version

    low, high = TESTED_DEEPSPEED
    if Version(low) <= Version(deepspeed.__version__) < Version(high):
        return None
    return (
        f"DeepSpeed {deepspeed.__version__} is outside the tested range (>= {low}, < {high}); "
        f"`make check` tells whether this framework works with it"
    )


# ---------------------------------------------------------------------------------------------
# The engine


def install_checkpoint_engine(ds_engine: Any, checkpoint_engine: CheckpointEngine) -> None:
    """Make `save_checkpoint` hand every file to `checkpoint_engine` (DeepSpeed picks its own at
    initialize and offers no setter)."""
    _require(ds_engine, "checkpoint_engine", "replacing the engine's checkpoint engine")
    ds_engine.checkpoint_engine = checkpoint_engine


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def engine_counters(ds_engine: Any) -> dict[str, int]:
    """DeepSpeed's own progress counters (its load_checkpoint restores them; resharding must)."""
    return {name: int(_require(ds_engine, name, "the engine's step counters")) for name in ENGINE_COUNTERS}


def set_engine_counters(ds_engine: Any, counters: dict[str, int]) -> None:
    for name in ENGINE_COUNTERS:
        _require(ds_engine, name, "the engine's step counters")
        setattr(ds_engine, name, int(counters[name]))


def base_optimizer(ds_optimizer: Any) -> Any:
    """The torch optimizer inside DeepSpeed's ZeRO, bf16 or fp16 wrapper (itself when unwrapped)."""
    return getattr(ds_optimizer, "optimizer", ds_optimizer)


def adam_step(ds_optimizer: Any) -> int:
    """AdamW's step count (its bias correction), the same for every parameter; 0 before any step."""
    for state in base_optimizer(ds_optimizer).state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return 0


def set_adam_step(ds_optimizer: Any, step: int) -> None:
    for state in base_optimizer(ds_optimizer).state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


# ---------------------------------------------------------------------------------------------
# Parameter markers

# Set by our tensor-parallel layers on every sharded parameter: DeepSpeed's (and Megatron's) marker,
# which DeepSpeed's gradient-norm code reads to count a shard on every TP rank.
TENSOR_PARALLEL_ATTRIBUTE = "tensor_model_parallel"


def is_tensor_parallel(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, TENSOR_PARALLEL_ATTRIBUTE, False))


def mark_tensor_parallel(param: torch.nn.Parameter) -> None:
    setattr(param, TENSOR_PARALLEL_ATTRIBUTE, True)


def is_pipeline_tied_copy(param: torch.nn.Parameter) -> bool:
    """The last stage's copy of a tied embedding (DeepSpeed counts the first stage's)."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def is_zero3_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_status")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The parameter's shape, also once ZeRO-3 has partitioned it (its `.data` is then empty)."""
    return param.ds_shape if is_zero3_partitioned(param) else param.shape  # type: ignore[attr-defined]


def tied_weights(module: Any) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
    """(name, parameter, process group) of every weight a PipelineModule ties across stages."""
    for key, comm in getattr(module, "tied_comms", {}).items():
        owner: torch.nn.Module = comm["module"]
        for attribute in comm["weight_attr"]:
            yield f"{key}.{attribute}", owner.get_parameter(attribute), comm["group"]


# ---------------------------------------------------------------------------------------------
# The layout's groups and the pipeline's stage boundaries


def pipeline_grid(pp: int, tp: int, dp: int) -> tuple[Any, Any]:
    """DeepSpeed's (PipeModelDataParallelTopology, PipelineParallelGrid) for this layout: the grid is
    the `mpu` DeepSpeed shards ZeRO state by (it lives in an internal module)."""
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return topology, PipelineParallelGrid(topology=topology, process_group=dist.group.WORLD)


def tensor_parallel_group(grid: Any) -> Any:
    """The grid's group of this rank's tensor-parallel peers (DeepSpeed calls it the slice group)."""
    return _require(grid, "get_slice_parallel_group", "the tensor-parallel group")()


def skipped_steps(ds_engine: Any) -> int:
    """Updates the engine refused so far (non-finite gradients); read on the host after every step."""
    return int(_require(ds_engine, "skipped_steps", "the engine's step counters"))


class PrebuiltTiedLayer(TiedLayerSpec):
    """A TiedLayerSpec whose module we built (and sliced for tensor parallelism) ourselves: DeepSpeed
    calls `build()` on the stages that hold the layer, and we hand it ours instead of a new one."""

    def __init__(self, key: str, module: torch.nn.Module | None, forward_fn: Any = None):
        super().__init__(key, torch.nn.Module, forward_fn=forward_fn, tied_weight_attr=["weight"])
        self.module = module

    def build(self, log: bool = False) -> torch.nn.Module:
        assert self.module is not None, "DeepSpeed asked for a tied layer of another stage"
        return self.module


class PresetPartitionPipeline(PipelineModule):
    """PipelineModule with the stage boundaries we computed (DeepSpeed's own methods would build
    every layer on every rank just to count parameters): overrides its private `_partition_layers`
    and calls its private `_set_bounds`."""

    def __init__(self, layers: list[Any], parts: list[int], **kwargs: Any):
        for method in ("_partition_layers", "_set_bounds"):
            _require(PipelineModule, method, "presetting pipeline stage boundaries")
        object.__setattr__(self, "_preset_parts", parts)
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = self._preset_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


# ---------------------------------------------------------------------------------------------
# Checkpoint files (checked against files our trainer writes)


def model_states_file(mp_rank: int, dp_rank: int = 0, zero3: bool = False) -> str:
    """Module weights (and, without ZeRO, optimizer state) of model-parallel rank `mp_rank`."""
    if zero3:
        return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


ZERO3_FIRST_MODEL_STATES_GLOB = "zero_pp_rank_*_mp_rank_00_model_states.pt"


def optim_states_files(mp_rank: int, dp_rank: int) -> tuple[str, str]:
    """(ZeRO's name, the bf16 optimizer's name) of one rank's optimizer partition."""
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"
    return name, f"bf16_{name}"


def layer_file(index: int, tp_rank: int) -> str:
    """A pipeline layer's module weights."""
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


class Keys:
    """Keys DeepSpeed writes inside those files (the torch optimizer's own state_dict keys aside)."""

    MODULE = "module"  # model states: this rank's module weights
    OPTIMIZER = "optimizer"  # model states: the optimizer without ZeRO (fp16: FP16_MASTERS in it)
    FP16_MASTERS = "fp32_groups"
    PARAM_SHAPES = "param_shapes"  # model states under ZeRO: the order inside the flat buffers
    PARALLEL_DIMENSIONS = "checkpoint_parallel_dimensions"  # with TP_DEGREE, PP_DEGREE
    TP_DEGREE, PP_DEGREE = "tp_degree", "pp_degree"
    DS_CONFIG = "ds_config"
    DP_WORLD_SIZE = "dp_world_size"
    GLOBAL_STEPS = "global_steps"
    SLICE_MAPPINGS = "param_slice_mappings"  # optimizer file of the bf16 optimizer
    ALIGNMENT_PADDINGS = "param_alignment_paddings"  # optimizer file of ZeRO 1-2


OPTIMIZER_STATE_KEY = "optimizer_state_dict"  # optimizer files: the wrapper's state


def flat_masters_key(zero_stage: int) -> str:
    """The optimizer file's key of this rank's flat fp32 masters (ZeRO 1-2 and the bf16 optimizer
    file them alike)."""
    return "fp32_flat_groups" if zero_stage == 3 else "single_partition_of_fp32_groups"


def base_optimizer_key(zero_stage: int) -> str:
    """The optimizer file's key of the wrapped torch optimizer's state (the Adam moments)."""
    return "optimizer_state_dict" if zero_stage == 3 else "base_optimizer_state"


def expert_optimizer_groups(optimizer_state: dict[str, Any]) -> set[int]:
    """Indices of the MoE parameter groups (`expert_parameter_group`) in a ZeRO 1-2 optimizer file's
    state: their flat buffers hold one EP rank's experts, split over its expert-data-parallel ranks."""
    groups = (optimizer_state.get(base_optimizer_key(1)) or {}).get("param_groups") or []
    return {i for i, group in enumerate(groups) if group.get("moe")}


def partition_counts(optimizer_state: dict[str, Any]) -> list[int] | None:
    """Over how many ranks each parameter group's flat buffer is split (ZeRO 1-2 files; None when
    not saved)."""
    counts = optimizer_state.get("partition_count")
    return [int(c) for c in counts] if isinstance(counts, list | tuple) else None


def universal_checkpoint_keys() -> Any:
    """The module of key names DeepSpeed's universal-checkpoint tools (`ds_to_universal`) read."""
    from deepspeed.checkpoint import constants

    return constants


def pickled_globals() -> list[Any]:
    """The only non-tensor objects DeepSpeed pickles into its checkpoints (enum, loss-scaler state,
    fragment addresses): what `torch.load(weights_only=True)` must be allowed to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]
