"""Every use of DeepSpeed's internals, in one place.

The framework drives DeepSpeed through its public API (`deepspeed.initialize`, `save_checkpoint`,
`load_checkpoint`, `train_batch`, `safe_set_full_*`) and, where that API stops short, through the
private attributes, private methods and on-disk layouts below. Each is named here once and checked
by `tests/test_deepspeed_compat.py` against the installed DeepSpeed, so a release that changes one
fails at this module, with `DeepSpeedIncompatible` naming the internal that moved, instead of deep
inside a resume at 3 a.m. `TESTED_DEEPSPEED` is the range `pyproject.toml` pins.

Sections: the engine (checkpoint engine, counters, the wrapped torch optimizer); resharding (writing
full fp32 masters, moments and ZeRO-3 shards into a live engine); parameter markers; the pipeline's
stage boundaries; the checkpoint files (names, keys, the classes DeepSpeed pickles); in `shm`, the CPU
accelerator's shared-memory buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pretrain.deepspeed_compat.shm import (
    remove_orphaned_shm_buffers,
    shm_allreduce_buffer,
    unlink_shm_allreduce_buffer,
)
from pretrain.errors import PretrainError

TESTED_DEEPSPEED = ("0.19.8", "0.20")  # [lowest tested, first untested)

__all__ = [
    "CheckpointEngine",
    "DeepSpeedIncompatible",
    "PresetPartitionPipeline",
    "remove_orphaned_shm_buffers",
    "shm_allreduce_buffer",
    "unlink_shm_allreduce_buffer",
]


class DeepSpeedIncompatible(PretrainError, RuntimeError):
    """The installed DeepSpeed lacks an internal this framework relies on."""

    def __init__(self, internal: str, where: str):
        import deepspeed

        low, high = TESTED_DEEPSPEED
        super().__init__(
            f"DeepSpeed {deepspeed.__version__} has no {internal} ({where}); this framework is tested with "
            f"DeepSpeed >= {low}, < {high}: install one (pip install 'deepspeed>={low},<{high}'), or adapt "
            f"pretrain/deepspeed_compat/ and run `make check`"
        )


def _require(obj: Any, attribute: str, where: str) -> Any:
    if not hasattr(obj, attribute):
        raise DeepSpeedIncompatible(f"attribute {type(obj).__name__}.{attribute}", where)
    return getattr(obj, attribute)


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
# Resharding: full tensors into a live engine

# Where DeepSpeed's optimizer wrappers keep this rank's flat fp32 partitions, one per parameter group:
# ZeRO 1-2, the bf16 optimizer, ZeRO-3.
FLAT_PARTITION_ATTRIBUTES = (
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
    "fp32_partitioned_groups_flat",
)


def _step_tensor(optimizer: Any, param: torch.Tensor, step: int) -> torch.Tensor:
    """AdamW's step counter as torch itself makes it (on the device for fused or capturable AdamW).
    CPU Adam (offload) keeps an int, but takes this tensor too: its C++ binding reads it as an int."""
    on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def create_optimizer_state(ds_optimizer: Any, step: int) -> None:
    """torch's AdamW creates its state at the first step; a resumed engine has taken none yet. Create
    it (zeros, overwritten next) for DeepSpeed's flat partitions and let DeepSpeed link each
    parameter's fragment of it, as it does after its first step."""
    base = getattr(ds_optimizer, "optimizer", None)
    for attribute in FLAT_PARTITION_ATTRIBUTES:
        if base is None or not hasattr(ds_optimizer, attribute):
            continue
        for flat in getattr(ds_optimizer, attribute):
            state = base.state[flat]
            if "exp_avg" not in state:
                state.update(
                    step=_step_tensor(base, flat, step),
                    exp_avg=torch.zeros_like(flat),
                    exp_avg_sq=torch.zeros_like(flat),
                )
        if hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
            _require(ds_optimizer, "_hp_optimizer_states_linked", "linking resharded optimizer state")
            ds_optimizer._hp_optimizer_states_linked = False
            ds_optimizer._lazy_init_hp_params_optimizer_state()
        return


def set_full_state(
    ds_engine: Any, param: torch.nn.Parameter, kind: str, value: torch.Tensor, step: int
) -> None:
    """Give `param` of a live engine its full (this rank's TP slice) fp32 master (`kind` 'fp32') or
    Adam moment ('exp_avg', 'exp_avg_sq'), wherever the layout keeps it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device)
    zero3 = hasattr(param, "ds_id")
    if zero3 or hasattr(param, "_hp_mapping"):  # ZeRO 1-3 and the bf16 optimizer keep fp32 partitions
        if kind != "fp32":
            safe_set_full_optimizer_state(param, value, kind)
            return
        safe_set_full_fp32_param(param, value)
        if zero3:
            _set_zero3_weight(param, value)
        else:
            param.data.copy_(value.view_as(param).to(param.dtype))
        return
    # torch's AdamW itself (fp32 without ZeRO): the module weight is the master
    if kind == "fp32":
        param.data.copy_(value.view_as(param))
        return
    state = ds_engine.optimizer.state[param]
    if "step" not in state:
        state["step"] = _step_tensor(ds_engine.optimizer, param, step)
    state[kind] = value.view_as(param).clone()


def _set_zero3_weight(param: Any, value: torch.Tensor) -> None:
    """ZeRO-3 keeps this rank's 1/dp of each weight (ceil-sized, zero-padded) in `ds_tensor`, and
    small persistent parameters whole in `param.data` as well."""
    import torch.distributed as dist

    shard = _require(param, "ds_tensor", "a ZeRO-3 parameter's local shard")
    group = _require(param, "ds_process_group", "a ZeRO-3 parameter's process group")
    flat = value.flatten().to(shard.dtype)
    size = shard.numel()
    start = dist.get_rank(group=group) * size
    piece = flat[start : start + size]
    shard.data.zero_()
    shard.data[: piece.numel()].copy_(piece)
    if param.data.numel() == value.numel():
        param.data.copy_(value.view_as(param.data).to(param.data.dtype))


# ---------------------------------------------------------------------------------------------
# Resharding: only this rank's fragment into a live engine


def optimizer_sharding(param: torch.nn.Parameter) -> str:
    """How the layout keeps `param`'s fp32 master and moments: 'zero3' (a flat 1/dp partition per
    parameter), 'fragments' (ZeRO 1-2 and the bf16 optimizer: a contiguous piece of the parameter, or
    none, in this rank's flat partition) or 'whole' (torch's AdamW holds them whole)."""
    if hasattr(param, "ds_id"):
        return "zero3"
    return "fragments" if hasattr(param, "_hp_mapping") else "whole"


def zero3_partition(param: Any) -> tuple[int, int]:
    """(start, size) of this rank's ZeRO-3 partition in the flattened parameter: ceil(numel / dp)
    elements at rank x size, the last rank's zero-padded past the end (DeepSpeed's `_partition_param`)."""
    import torch.distributed as dist

    shard = _require(param, "ds_tensor", "a ZeRO-3 parameter's local shard")
    group = _require(param, "ds_process_group", "a ZeRO-3 parameter's process group")
    size = shard.numel()
    return dist.get_rank(group=group) * size, size


def fragment_range(param: Any) -> tuple[int, int] | None:
    """(start, numel) of the piece of the flattened parameter this rank's ZeRO 1-2 / bf16-optimizer
    partition holds; None when the partition holds none of it."""
    mapping = _require(param, "_hp_mapping", "a ZeRO 1-2 parameter's fragment mapping")
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return int(address.start), int(address.numel)


def set_local_state(param: Any, kind: str, value: torch.Tensor) -> None:
    """Give `param` this rank's part of its fp32 master ('fp32') or an Adam moment: under ZeRO-3 the
    padded partition (`zero3_partition`, the module's own shard set to it too), under ZeRO 1-2 the
    fragment (`fragment_range`; the module weight is set from the whole value by `set_full_state`)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if optimizer_sharding(param) == "zero3":
        value = value.to(param.ds_tensor.device)
        if kind == "fp32":
            safe_set_local_fp32_param(param, value)
            param.ds_tensor.data.copy_(value.to(param.ds_tensor.dtype))
        else:
            safe_set_local_optimizer_state(param, value, kind)
        return
    fragment = param._hp_mapping.get_hp_fragment(None if kind == "fp32" else kind)
    fragment.data.copy_(value.to(fragment.device))


class Zero3Partitioned:
    """While open, every ZeRO-3 parameter is released to its partition, the small persistent ones too
    (DeepSpeed's own checkpoint prologue); on close the persistent ones are gathered again from the
    partitions written meanwhile, so no rank needs their whole value from the cache."""

    def __init__(self, ds_optimizer: Any):
        self.optimizer = ds_optimizer
        self.active = hasattr(ds_optimizer, "checkpoint_event_prologue")

    def __enter__(self) -> Zero3Partitioned:
        if self.active:
            _require(self.optimizer, "checkpoint_event_epilogue", "gathering ZeRO-3's persistent parameters")
            self.optimizer.checkpoint_event_prologue()
        return self

    def __exit__(self, error: type[BaseException] | None, *exc: object) -> None:
        if self.active and error is None:  # a gather after a failed read would wait for the failed rank
            self.optimizer.checkpoint_event_epilogue()


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


def zero3_partition_bytes(module: torch.nn.Module) -> int:
    """Bytes of this rank's ZeRO-3 partitions of `module`'s parameters (and of any still whole)."""
    total = 0
    for param in module.parameters():
        shard = getattr(param, "ds_tensor", None)
        held = shard if shard is not None else param.data
        total += held.numel() * held.element_size()
    return total


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
