"""Resharding's writes into a live engine: full tensors (the whole TP slice of a parameter) and only
this rank's fragment (its ZeRO partition or optimizer fragment). Part of `pretrain.deepspeed_compat`,
the one place DeepSpeed's internals are used."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.deepspeed_compat.errors import require as _require

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
