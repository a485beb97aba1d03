"""`parallelize_model`: the plain model, cut to this rank's part of the layout, in one fixed order.

1. Choose this rank's layers: all of them, or its pipeline stage's (`partition_layers`).
2. Build each of them from the plain model's definition, one at a time on the CPU, initialised from
   the layer's own seed (so every layout starts from the same numbers), or, with
   checkpoint.init_weights, with that layer's full tensors read from the consolidated file.
3. Apply the tensor-parallel plan: slice the weights, swap in parallel layers and the loss; then
   expert parallelism: keep this rank's slice of each MoE block's routed experts.
4. Set activation recomputation on the decoder blocks, and compile them (train.compile).
5. Move to the device; under ZeRO-3 cut it into this rank's data-parallel partitions at once
   (pretrain.parallel.zero3).
6. Assemble: a `Transformer` (one stage) or DeepSpeed's `PipelineModule`.

At most one full layer exists beyond this rank's own shards (ZeRO-3: its partitions) at any time.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import Config
from pretrain.model.layers import DecoderBlock
from pretrain.model.names import layer_name
from pretrain.model.transformer import CausalLMLoss, Transformer, build_layer, num_layers
from pretrain.parallel.expert_parallel import apply_expert_parallel, held_experts, set_loss_gradient_scale
from pretrain.parallel.recompute import apply_activation_checkpointing
from pretrain.parallel.tensor_parallel import VocabParallelCausalLMLoss
from pretrain.parallel.topology import ParallelContext
from pretrain.parallel.tp_plan import apply_tensor_parallel


def parallelize_model(
    cfg: Config, ctx: ParallelContext, device: torch.device, precision: str = "fp32"
) -> nn.Module:
    """This rank's model: a `Transformer` holding its tensor-parallel shards when pp == 1, else a
    DeepSpeed `PipelineModule` holding its stage. `precision`: the resolved training precision, which
    ZeRO-3 partitions are cast to (other stages are cast by DeepSpeed's engine)."""
    local = build_rank_layers(cfg, ctx, device, precision)
    indices = sorted(local)
    loss = _loss(cfg, ctx)
    if ctx.pp == 1:
        return Transformer(cfg.model, cfg.padded_vocab_size, layers=[local[i] for i in indices], loss=loss)
    from pretrain.parallel.partition import partition_layers
    from pretrain.parallel.pipeline import build_pipeline

    return build_pipeline(cfg, local, partition_layers(cfg), loss, ctx.topology)


def rank_layer_sources(cfg: Config, ctx: ParallelContext) -> list[tuple[int, int]]:
    """This rank's layers as (position in the layer list, layer whose definition it is built from):
    all of them, or its pipeline stage's. The tied output layer of a pipeline is a copy of the
    embedding (layer 0) on the last stage."""
    total = num_layers(cfg.model)
    if ctx.pp > 1:
        from pretrain.parallel.partition import partition_layers

        parts = partition_layers(cfg)
        indices = list(range(parts[ctx.pp_rank], parts[ctx.pp_rank + 1]))
    else:
        indices = list(range(total))
    tied_pipeline_head = cfg.model.tie_embeddings and ctx.pp > 1 and total - 1 in indices
    return [(i, 0 if tied_pipeline_head and i == total - 1 else i) for i in indices]


def build_rank_layers(
    cfg: Config, ctx: ParallelContext, device: torch.device, precision: str = "fp32"
) -> dict[int, nn.Module]:
    """Steps 1-5 for this rank, each layer moved to `device` (and, under ZeRO-3, partitioned) as soon
    as it is cut: position in the layer list -> layer.

    Under `torch.device("meta")` (with device meta) nothing is allocated or initialised and no process
    group is touched, which is how `pretrain.plan` checks that a layout builds."""
    init, init_path = None, cfg.checkpoint.init_weights
    if init_path is not None:
        from pretrain.parallel.distributed import all_ranks_succeed
        from pretrain.weights.consolidated import open_init_weights

        init = all_ranks_succeed(lambda: open_init_weights(init_path, cfg.model))
    partition = None
    if cfg.parallel.zero_stage == 3 and device.type != "meta":
        from pretrain.parallel.zero3 import zero3_partitioner

        partition = zero3_partitioner(cfg, ctx, precision)
    local: dict[int, nn.Module] = {}
    experts = held_experts(cfg.model.moe.num_experts, ctx.ep, ctx.ep_rank)  # never all of them under EP
    for index, source in rank_layer_sources(cfg, ctx):
        if init is None:
            layer = build_layer(cfg.model, source, cfg.padded_vocab_size, cfg.seed, experts)
        else:
            layer = init.build_layer(cfg.model, source, cfg.padded_vocab_size, experts)
        layer = apply_tensor_parallel(layer, layer_name(cfg.model, source), ctx)
        layer = apply_expert_parallel(layer, ctx.ep, ctx.ep_rank, ctx.ep_group)
        set_loss_gradient_scale([layer], cfg.grad_accum_steps(ctx.tp * ctx.pp * ctx.dp))
        if isinstance(layer, DecoderBlock):
            apply_activation_checkpointing(layer, cfg.parallel.activation_checkpointing)
            if cfg.train.compile and device.type != "meta":
                # In place (Module.compile), so parameter names, checkpoints and exports stay the same.
                layer.compile()
        local[index] = layer.to(device)
        if partition is not None:
            partition(local[index])
    return local


def _loss(cfg: Config, ctx: ParallelContext) -> nn.Module:
    if ctx.tp == 1:
        return CausalLMLoss(cfg.model.vocab_size)
    rows = cfg.padded_vocab_size // ctx.tp
    return VocabParallelCausalLMLoss(cfg.model.vocab_size, ctx.tp_rank * rows, ctx.tp_group)
