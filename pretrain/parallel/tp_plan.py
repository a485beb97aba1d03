"""The tensor-parallel plan: which module of the plain model becomes which parallel layer.

Keys are module names in the plain `Transformer` (fnmatch patterns); the model code never sees a
process group. Attention and MLP follow Megatron-LM: q/k/v and gate/up split by output (whole heads,
whole SwiGLU channels per rank), o and down split by input, so each block needs one all-reduce (or
reduce-scatter + all-gather with sequence parallelism) per sub-layer. The embedding and the output
layer split the (padded) vocabulary, and the loss is computed without gathering logits.

`partition_dim` tells conversion and resharding how to merge or split a checkpoint's shards.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from pretrain.model.layers import RMSNorm
from pretrain.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelRMSNorm,
    VocabParallelEmbedding,
    shard,
)
from pretrain.parallel.topology import ParallelContext

TENSOR_PARALLEL_PLAN: dict[str, str] = {
    "embedding": "vocab",
    "blocks.*.attn_norm": "norm",
    "blocks.*.attn.q_proj": "column",
    "blocks.*.attn.k_proj": "column",
    "blocks.*.attn.v_proj": "column",
    "blocks.*.attn.o_proj": "row",
    "blocks.*.attn.q_norm": "head_norm",
    "blocks.*.attn.k_norm": "head_norm",
    "blocks.*.mlp_norm": "norm",
    "blocks.*.mlp.gate_proj": "column",
    "blocks.*.mlp.up_proj": "column",
    "blocks.*.mlp.down_proj": "row",
    # Mixture of experts: the shared experts like the dense MLP; router and routed experts replicated.
    "blocks.*.mlp.shared.gate_proj": "column",
    "blocks.*.mlp.shared.up_proj": "column",
    "blocks.*.mlp.shared.down_proj": "row",
    "norm": "norm",
    "head": "column",
}

_PARTITION_DIM = {"vocab": 0, "column": 0, "row": 1}


def style_of(module_name: str) -> str | None:
    for pattern, style in TENSOR_PARALLEL_PLAN.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


def partition_dim(param_name: str) -> int | None:
    """The dimension along which tensor parallelism splits the plain model's parameter `param_name`
    (e.g. 'blocks.3.attn.o_proj.weight' -> 1); None for replicated parameters (norms)."""
    style = style_of(param_name.rsplit(".", 1)[0])
    return _PARTITION_DIM.get(style) if style else None


def apply_tensor_parallel(layer: nn.Module, name: str, ctx: ParallelContext) -> nn.Module:
    """Swap the planned submodules of `layer` (called `name` in the plain model: 'embedding',
    'blocks.3', 'norm', 'head') for this rank's parallel versions; returns the layer, which is a new
    module when the layer itself is in the plan. Weights are sliced from the plain layer's, so every
    layout starts from the single-process model's numbers."""
    if ctx.tp == 1:
        return layer
    for sub_name, module in list(layer.named_modules()):
        full_name = f"{name}.{sub_name}" if sub_name else name
        style = style_of(full_name)
        if style is None:
            continue
        parallel = _parallel_module(style, module, ctx)
        if not sub_name:
            return parallel  # the planned layer is a leaf: nothing below it to visit
        parent_name, _, attr = sub_name.rpartition(".")
        setattr(layer.get_submodule(parent_name), attr, parallel)
    return layer


def _parallel_module(style: str, module: nn.Module, ctx: ParallelContext) -> nn.Module:
    group, sp, rank, world = ctx.tp_group, ctx.sequence_parallel, ctx.tp_rank, ctx.tp
    weight: torch.Tensor = module.get_parameter("weight").data
    if style == "column":
        return ColumnParallelLinear(shard(weight, 0, rank, world), group, sp)
    if style == "row":
        return RowParallelLinear(shard(weight, 1, rank, world), group, sp)
    if style == "vocab":
        rows = weight.shape[0] // world
        return VocabParallelEmbedding(shard(weight, 0, rank, world), rank * rows, group, sp)
    assert style in ("norm", "head_norm") and isinstance(module, RMSNorm), (style, module)
    if style == "head_norm":  # each rank normalises its own heads: the weight's gradient is a sum
        return SequenceParallelRMSNorm(weight.clone(), module.eps, group)
    # Without sequence parallelism a norm sees every position on every rank: replicated as it is.
    return SequenceParallelRMSNorm(weight.clone(), module.eps, group) if sp else module
