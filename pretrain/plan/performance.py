"""Estimated step time, tokens/s and MFU of a layout: an analytic model, every term documented.

Per micro-batch, on the slowest pipeline stage, the GPU time is the sum of
  compute       its matmul FLOPs (the trainer's FLOP count, pretrain/model/flops.py, for the stage's
                layers, divided over the tensor-parallel ranks), plus the recomputed forward of its
                blocks under full recomputation (selective recomputes only elementwise work, and on a
                GPU keeps the attention output), at peak x matmul_efficiency
  elementwise   norms, rotary, SwiGLU activation, residual adds, softmax: memory-bound. Assumed to move
                every activation the block creates four times through HBM (written and read forward,
                read and its gradient written backward; twice more when it is recomputed), at
                HBM bandwidth x hbm_efficiency
  tensor-par.   this code's collectives per block: forward one all-reduce after attention and one after
                the MLP; backward one per column-parallel linear (q, k, v, gate, up: five, since they are
                separate linears) -> 7 all-reduces of p N d bytes (sequence parallelism: the same volume
                as all-gathers and reduce-scatters), 9 with full recomputation; a ring all-reduce moves
                2 (t-1)/t of the bytes, plus a fixed latency; not overlapped with compute (the calls are
                synchronous)
and the host time is the number of ATen operations of a block's forward and backward
(HOST_OPS_PER_BLOCK, counted on a real block by the tests) x host_op_s; the GPU runs asynchronously, so a block takes the longer of the two.
Per step:
  pipeline      1F1B: (micro-batches + pp - 1) x the slowest stage's micro-batch time; the pp - 1 extra
                slots are the bubble. Activations between stages (and their gradients): one send each
                way per micro-batch, on the critical path
  data-par.     gradients reduce-scattered and weights all-gathered once per step, (Nd-1)/Nd of the
                stage's bytes each, gradients in their communication dtype (fp32 for bf16 training with
                train.grad_accum_dtype=fp32: DeepSpeed's communication_data_type), weights in the model's.
                DeepSpeed's BF16_Optimizer (bf16 at ZeRO-0, and at ZeRO-1 with fp32 accumulation) all-reduces
                the gradients instead (engine.buffered_allreduce_fallback: twice the volume), after the
                backward pass; ZeRO-2 reduce-scatters every micro-batch's gradients, not once per step (the
                engine: "ZeRO stage >= 2 communicates during non gradient accumulation boundaries");
                ZeRO-3: per micro-batch and per layer, gathered forward and backward and reduce-scattered,
                overlapped with that micro-batch's compute. Without a pipeline DeepSpeed's ZeRO optimizer
                overlaps each reduction with the backward pass (overlap_comm); the all-gather after the
                step is exposed
  optimizer     fused Adam over the rank's optimizer partition: ~36 bytes of HBM traffic per parameter
  all-to-all    mixture of experts: the token exchanges over the expert-parallel group, per MoE block
                and micro-batch (pretrain.plan.experts), on the critical path
Bandwidth of a group: NVLink when all its ranks are in one node, else the network, x comm_efficiency.
MFU = model FLOPs per token x tokens/s / (GPUs x peak), as the trainer reports it. Mixture of experts:
FLOPs are those of the active parameters (the routed experts' not divided over tensor-parallel ranks,
which all compute them), the routed experts' gradients and weights go over the dp/ep ranks holding
the same experts, and their optimizer partition is theirs (pretrain.plan.experts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.config import Config
from pretrain.model.flops import flops_per_token
from pretrain.plan import activations as act
from pretrain.plan import experts as moe
from pretrain.plan.counts import rank_expert_parameters, stage_layers
from pretrain.plan.hardware import Cluster
from pretrain.plan.memory import CUDA, dtype_bytes, planned_precision

ADAM_BYTES_PER_PARAMETER = 36  # read fp32 master, m, v, grad (bf16 + its fp32 copy); write master, m, v, bf16
ELEMENTWISE_PASSES = 4  # HBM passes per activation byte, forward and backward (an assumption)
TP_COLLECTIVES_PER_BLOCK = {"none": 7, "selective": 7, "full": 9}


@dataclass(frozen=True)
class StepEstimate:
    """Seconds per optimizer step, by cause, and what follows from them."""

    micro_batch_s: float  # the slowest stage, one micro-batch forward and backward
    compute_s: float  # per step, the slowest stage's matmuls (all micro-batches)
    elementwise_s: float
    tensor_parallel_s: float
    all_to_all_s: float  # per step, the slowest stage's expert-parallel token exchanges
    all_to_all_bytes_per_block: float  # one exchange's bytes per rank (a micro-batch's N k rows)
    host_bound: bool  # the slowest stage waits for the host (eager PyTorch), not for the GPU
    bubble_s: float
    pipeline_p2p_s: float
    data_parallel_s: float  # exposed
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    bubble_fraction: float


# ATen operations of one DecoderBlock's forward and backward (grouped-query attention), by recomputation
# mode: counted on a real block by tests/test_plan.py (a dispatch mode that counts every op), which
# fails when the block changes enough to make these stale.
HOST_OPS_PER_BLOCK = {"none": 222, "selective": 334, "full": 333}


def block_flops(cfg: Config, moe_block: bool = False) -> tuple[float, float]:
    """(training FLOPs per token of one decoder block, dense or `moe_block`, of the output layer), split
    from the trainer's own count: the output layer is what remains with no blocks."""
    seq, model = cfg.train.seq_len, cfg.model
    head = flops_per_token(dataclasses.replace(model, num_layers=0), seq)
    dense_first = 0 if moe_block else 1
    one = dataclasses.replace(
        model, num_layers=1, moe=dataclasses.replace(model.moe, first_dense_layers=dense_first)
    )
    return float(flops_per_token(one, seq) - head), float(head)


def _collective_s(cluster: Cluster, nbytes: float, ranks: int, span: int, passes: float) -> float:
    """A ring collective over `ranks` ranks within `span` consecutive ranks moving `passes` x (r-1)/r
    of `nbytes` per rank (all-reduce 2, reduce-scatter or all-gather 1)."""
    if ranks == 1:
        return 0.0
    moved = passes * (ranks - 1) / ranks * nbytes
    return cluster.group_latency_s(span) + moved / (cluster.group_bandwidth_gbps(span) * 1e9)


@dataclass(frozen=True)
class _MicroBatch:
    compute: float
    elementwise: float
    tensor_parallel: float
    all_to_all: float
    host: float

    @property
    def gpu(self) -> float:
        return self.compute + self.elementwise + self.tensor_parallel + self.all_to_all

    @property
    def total(self) -> float:
        # The exchanges are not hidden behind host time: the host reads each block's counts (.tolist())
        # before it can send the tokens, so it waits for them.
        return max(self.gpu - self.all_to_all, self.host) + self.all_to_all


def _block_matmul_flops(cfg: Config, dense: int, moe_blocks: int) -> float:
    """Training FLOPs of one rank's blocks per token of its micro-batch, without recomputation: split
    over tp but for the routed experts, which every tensor-parallel rank computes whole."""
    tp = cfg.parallel.tp
    total = dense * block_flops(cfg)[0] / tp
    if moe_blocks:
        routed = moe.routed_flops_per_token(cfg)
        total += moe_blocks * ((block_flops(cfg, moe_block=True)[0] - routed) / tp + routed)
    return total


def all_to_all_s(cfg: Config, cluster: Cluster, moe_blocks: int, dtype_bytes: int) -> float:
    """Seconds of one micro-batch's expert-parallel exchanges in `moe_blocks` MoE blocks: per block
    `exchanges_per_block` all-to-alls of `dispatch_bytes` over the ep ranks of the group, which lie
    within ep x tp consecutive ranks (data-parallel peers are tp apart)."""
    ep = cfg.parallel.ep
    if ep == 1 or not moe_blocks:
        return 0.0
    span = ep * cfg.parallel.tp
    tokens, counts = moe.exchanges_per_block(cfg.parallel.activation_checkpointing)
    one = _collective_s(cluster, moe.dispatch_bytes(cfg, dtype_bytes), ep, span, passes=1)
    return moe_blocks * (tokens * one + counts * cluster.group_latency_s(span))


def _stage_micro_batch(
    cfg: Config,
    cluster: Cluster,
    shape: act.ActivationShape,
    kinds: tuple[int, int],
    has_head: bool,
    precision: str,
) -> _MicroBatch:
    """One micro-batch of a stage with `kinds` = (dense blocks, MoE blocks)."""
    gpu, a, par = cluster.gpu, cluster.assumptions, cfg.parallel
    mode = par.activation_checkpointing
    (dense, moe_blocks), blocks = kinds, sum(kinds)
    head = block_flops(cfg)[1] / par.tp if has_head else 0.0
    flops = _block_matmul_flops(cfg, dense, moe_blocks) * (4 / 3 if mode == "full" else 1.0) + head
    compute = flops * shape.tokens / (gpu.peak_tflops(precision) * 1e12 * gpu.matmul_efficiency)
    passes = ELEMENTWISE_PASSES + (2 if mode != "none" else 0)
    block_bytes = dense * act.block_bytes(shape, "none")
    block_bytes += moe_blocks * act.block_bytes(shape, "none", moe=True) if moe_blocks else 0.0
    elementwise = passes * block_bytes / (gpu.hbm_gbps * 1e9 * a.hbm_efficiency)
    message = shape.dtype_bytes * shape.tokens * shape.hidden
    collectives = blocks * TP_COLLECTIVES_PER_BLOCK[mode]
    tensor_parallel = collectives * _collective_s(cluster, message, par.tp, par.tp, passes=2)
    exchanges = all_to_all_s(cfg, cluster, moe_blocks, shape.dtype_bytes)
    host = (blocks * HOST_OPS_PER_BLOCK[mode] + (collectives if par.tp > 1 else 0)) * a.host_op_s
    return _MicroBatch(compute, elementwise, tensor_parallel, exchanges, host)


def estimate_step(cfg: Config, cluster: Cluster, stage_parameters: list[int]) -> StepEstimate:
    """Step time of `cfg` on `cluster`; `stage_parameters` are one rank's parameters per stage."""
    par, world = cfg.parallel, cluster.world_size
    precision = planned_precision(cfg.train.precision, CUDA)
    shape = act.ActivationShape.of(cfg, dtype_bytes(precision), attention_output_saved=True)
    dp, m = cfg.data_parallel_size(world), cfg.grad_accum_steps(world)
    layer_lists = stage_layers(cfg)
    kinds = set()  # stages differ only by their block counts and whether they hold the output layer
    for s, indices in enumerate(layer_lists):
        kinds.add((moe.block_kinds(cfg, indices), s == par.pp - 1))
    stages = [_stage_micro_batch(cfg, cluster, shape, blocks, head, precision) for blocks, head in kinds]
    slowest = max(stages, key=lambda mb: mb.total)
    slots = m + par.pp - 1
    p2p = 0.0
    if par.pp > 1:
        # Stages are dp x tp ranks apart: one pipeline spans (pp - 1) dp tp + 1 consecutive ranks.
        span = (par.pp - 1) * dp * par.tp + 1
        p2p = 2 * slots * _collective_s(cluster, act.boundary_bytes(shape), 2, span, passes=2)
    layers = max(len(indices) for indices in layer_lists)
    # The stage with the most parameters, and its routed experts' share.
    params, experts = max(zip(stage_parameters, rank_expert_parameters(cfg), strict=True))
    dp_s = _data_parallel_s(cfg, cluster, (params, experts), layers, dp, m, slowest, precision)
    edp = moe.expert_data_parallel_size(cfg, world)
    partitioned = par.zero_stage >= 1 or precision != "fp32"
    optimizer_params = moe.partition(params, experts, dp, edp) if partitioned else params
    optimizer = (
        ADAM_BYTES_PER_PARAMETER
        * optimizer_params
        / (cluster.gpu.hbm_gbps * 1e9 * cluster.assumptions.hbm_efficiency)
    )
    step = slots * slowest.total + p2p + dp_s + optimizer
    tokens = cfg.tokens_per_step / step
    model_flops = flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    return StepEstimate(
        micro_batch_s=slowest.total,
        compute_s=m * slowest.compute,
        elementwise_s=m * slowest.elementwise,
        tensor_parallel_s=m * slowest.tensor_parallel,
        all_to_all_s=m * slowest.all_to_all,
        all_to_all_bytes_per_block=moe.dispatch_bytes(cfg, shape.dtype_bytes)
        if cfg.model.moe.enabled
        else 0.0,
        host_bound=slowest.host > slowest.gpu,
        bubble_s=(par.pp - 1) * slowest.total,
        pipeline_p2p_s=p2p,
        data_parallel_s=dp_s,
        optimizer_s=optimizer,
        step_s=step,
        tokens_per_s=tokens,
        mfu=model_flops / (world * cluster.gpu.peak_tflops(precision) * 1e12),
        bubble_fraction=(par.pp - 1) / slots,
    )


def _data_parallel_s(
    cfg: Config,
    cluster: Cluster,
    counts: tuple[int, int],
    layers: int,
    dp: int,
    micro_batches: int,
    micro: _MicroBatch,
    precision: str,
) -> float:
    """Exposed seconds of data-parallel gradient and weight traffic per step; `counts`: the stage's
    parameters on one rank and of them the routed experts', which go over the dp/ep ranks holding the
    same experts (ranks ep x tp apart, within the same span as the data-parallel group)."""
    if dp == 1:
        return 0.0
    params, experts = counts
    span = dp * cfg.parallel.tp  # data-parallel peers are tp ranks apart
    edp = dp // cfg.parallel.ep

    def collective(bytes_per_parameter: int, passes: float) -> float:
        dense = _collective_s(cluster, bytes_per_parameter * (params - experts), dp, span, passes)
        return dense + (
            _collective_s(cluster, bytes_per_parameter * experts, edp, span, passes) if experts else 0.0
        )

    weights = dtype_bytes(precision)
    fp32_sums = precision == "bf16" and cfg.train.grad_accum_dtype == "fp32"
    gradients = 4 if fp32_sums else dtype_bytes(precision)  # DeepSpeed's communication_data_type
    stage = cfg.parallel.zero_stage
    if stage == 3:  # (no MoE: the trainer refuses it under ZeRO-3)
        # Per layer: weights gathered for the forward and again for the backward, gradients scattered.
        per_layer = 2 * _collective_s(cluster, weights * params / layers, dp, span, passes=1) + _collective_s(
            cluster, gradients * params / layers, dp, span, passes=1
        )
        return micro_batches * max(0.0, layers * per_layer - micro.compute)
    gather = collective(weights, passes=1)  # the updated weights, after the step
    if precision == "bf16" and (stage == 0 or (stage == 1 and fp32_sums)):
        # DeepSpeed's BF16_Optimizer: an all-reduce of the accumulated gradients after the backward pass.
        return collective(gradients, passes=2) + gather
    if stage == 0:
        return collective(gradients, passes=2)  # plain data parallelism: one all-reduce
    scatter = collective(gradients, passes=1)
    if stage == 2:
        # Every micro-batch's gradients are reduce-scattered; without a pipeline each overlaps its backward.
        backward = micro.total * 2 / 3 if cfg.parallel.pp == 1 else 0.0
        return micro_batches * max(0.0, scatter - backward) + gather
    if cfg.parallel.pp == 1:
        backward = micro.total * 2 / 3  # the reduction overlaps the last backward pass (overlap_comm)
        return max(0.0, scatter - backward) + gather
    return scatter + gather
