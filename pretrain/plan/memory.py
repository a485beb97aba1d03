"""Per-GPU memory of a layout, per pipeline stage, broken down the way it is allocated.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, section 3.1: mixed-precision Adam keeps
2 bytes of weights, 2 of gradients and K = 12 of optimizer state per parameter: fp32 master weights,
momentum and variance) and are divided by the data-parallel size Nd for what each stage partitions:

    stage 0: 2 + 2 + 12 = 16     stage 1: 2 + 2 + 12/Nd     stage 2: 2 + (2 + 12)/Nd    stage 3: 16/Nd

plus what DeepSpeed (0.19, the version this repository runs) does on top, from its source:
  - fp32 training: 4 + 4 bytes of weights and gradients; DeepSpeed's ZeRO optimizer still clones an
    fp32 master partition (K = 12), plain torch AdamW at stage 0 updates the weights in place (K = 8).
  - bf16 at stage 0 (allowed here only with a pipeline) runs DeepSpeed's BF16_Optimizer: fp32 masters
    and Adam state partitioned over the data-parallel group like ZeRO-1, plus a flat gradient
    accumulation buffer in bf16.
  - ZeRO-1/2 without a pipeline (overlap_comm on) allocate two gradient buckets of
    reduce_bucket_size elements for every backward pass; ZeRO-1 under a pipeline one, at the reduction.
    `torch.empty` is resident on a GPU (caching allocator) but on a CPU only the pages written count.
  - at the optimizer step ZeRO-1 flattens this rank's gradient partition (one more copy), converts it
    to fp32 for the master weights (when training in 16 bits), and torch's multi-tensor (foreach) AdamW,
    used off CUDA, allocates one temporary the size of the partition (the fused CUDA kernel none).

The peak is the largest of three moments: construction (pretrain.parallel builds each rank's layers
in fp32 and moves them to the device before DeepSpeed converts them to 16 bits, so ZeRO 0-2 first
hold 4 bytes per parameter of the rank's whole stage and tensor-parallel shard, and DeepSpeed then
flattens the weights into one buffer, a second copy for fp32 training; ZeRO-3 cuts each layer into
this rank's partitions as soon as it is built: its partitions plus one whole fp32 layer), the end of the forward pass / start of the backward pass of the last in-flight
micro-batch (states, activations, buffers, working memory), and the optimizer step (activations
gone, gradient partition and step temporaries present). To it come a fragmentation margin and the
runtime reserve (see `Assumptions`).

Mixture of experts: the routed experts' states are partitioned over the dp/ep expert-data-parallel
ranks, the rest over dp; the MoE blocks' activations are their own (pretrain.plan.experts says how
and why, term by term; pretrain.plan.activations gives the activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import Config
from pretrain.parallel.deepspeed_config import zero3_bucket_elements, zero3_sub_group_size
from pretrain.parallel.recompute import selective_recompute_keeps
from pretrain.plan import activations as act
from pretrain.plan import experts as moe
from pretrain.plan.counts import layer_counts, rank_expert_parameters, rank_parameters, stage_layers
from pretrain.plan.hardware import Assumptions


def dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class Runtime:
    """How PyTorch and DeepSpeed behave on the device type, as far as memory goes."""

    device: str  # "cuda" or "cpu"

    @property
    def fused_optimizer(self) -> bool:
        """pretrain.parallel.engine.build_engine uses fused AdamW on CUDA, foreach elsewhere."""
        return self.device == "cuda"

    @property
    def empty_buffers_resident(self) -> bool:
        """Whether memory that `torch.empty` returns counts before anything is written into it."""
        return self.device == "cuda"

    @property
    def attention_output_saved(self) -> bool:
        """Whether selective recomputation caches the attention output: is the device's SDPA op in the
        policy's list (pretrain/parallel/recompute.py)?"""
        ops = torch.ops.aten
        op = (
            ops._scaled_dot_product_flash_attention.default
            if self.device == "cuda"
            else ops._scaled_dot_product_flash_attention_for_cpu.default
        )
        return selective_recompute_keeps(op)


CUDA = Runtime("cuda")
CPU = Runtime("cpu")


def planned_precision(requested: str, runtime: Runtime) -> str:
    """'auto' as pretrain.parallel.resolve_precision resolves it: bf16 on the (Ampere or newer) GPUs
    of the table, fp32 on CPUs."""
    if requested != "auto":
        return requested
    return "bf16" if runtime.device == "cuda" else "fp32"


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of this rank for weights, gradients and optimizer state."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def zero_bytes_per_parameter(stage: int, dp: int, precision: str) -> StateBytes:
    """The ZeRO paper's model-state bytes per parameter (DeepSpeed's ZeRO optimizer, Adam)."""
    p = dtype_bytes(precision)
    master = 4 if precision != "fp32" or stage >= 1 else 0  # see the module docstring for fp32
    return StateBytes(
        weights=p / (dp if stage >= 3 else 1),
        gradients=p / (dp if stage >= 2 else 1),
        optimizer=(master + 8) / (dp if stage >= 1 else 1),
    )


def model_state_bytes(stage: int, dp: int, precision: str, grad_accum: str = "bf16") -> StateBytes:
    """`zero_bytes_per_parameter`, with how DeepSpeed accumulates bf16 gradients (`grad_accum`:
    train.grad_accum_dtype): its BF16_Optimizer at stage 0, and at stage 1 with fp32 accumulation,
    keeps a flat accumulator of the whole stage's gradients in that dtype beside the bf16 gradients;
    ZeRO 2-3 keep their gradient partition in it."""
    if precision != "bf16":
        return zero_bytes_per_parameter(stage, dp, precision)
    accumulator = 4 if grad_accum == "fp32" else 2
    if stage == 0 or (stage == 1 and grad_accum == "fp32"):
        one = zero_bytes_per_parameter(1, dp, precision)
        return StateBytes(one.weights, one.gradients + accumulator, one.optimizer)
    states = zero_bytes_per_parameter(stage, dp, precision)
    if stage >= 2:
        return StateBytes(states.weights, accumulator / dp, states.optimizer)
    return states


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage `stage`."""

    stage: int
    parameters: int
    expert_parameters: int  # of them the routed experts' (1/ep of the stage's), partitioned over dp/ep
    weights: int
    gradients: int
    optimizer_states: int
    activations: int  # saved activations of every in-flight micro-batch, configured recomputation
    activations_by_mode: dict[str, int]  # the same for none / selective / full
    in_flight: int
    pipeline_buffers: int
    communication_buffers: int
    working: int  # short-lived during a backward pass (loss gradient, recomputed block)
    step_extra: int  # gradient partition and temporaries at the optimizer step, beyond the states
    construction: int  # building the rank's layers in fp32 before DeepSpeed partitions them

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer_states

    @property
    def backward_peak(self) -> int:
        return (
            self.states + self.activations + self.pipeline_buffers + self.communication_buffers + self.working
        )

    @property
    def step_peak(self) -> int:
        return self.weights + self.optimizer_states + self.step_extra

    def phases(self) -> dict[str, int]:
        return {
            "backward": self.backward_peak,
            "optimizer step": self.step_peak,
            "construction": self.construction,
        }

    @property
    def peak(self) -> int:
        return max(self.phases().values())

    @property
    def peak_phase(self) -> str:
        phases = self.phases()
        return max(phases, key=lambda name: phases[name])


@dataclass(frozen=True)
class MemoryPlan:
    stages: list[StageMemory]
    precision: str
    capacity: int
    fragmentation: int  # for the worst stage
    runtime_reserve: int

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def required(self) -> int:
        return self.worst.peak + self.fragmentation + self.runtime_reserve

    @property
    def fits(self) -> bool:
        return self.required <= self.capacity


def candidate_worst_stages(cfg: Config, layers: list[list[int]]) -> list[int]:
    """The first and last stage, and of the others the first with each count of dense and MoE blocks:
    a later stage with as many holds as many parameters and fewer micro-batches in flight, so never
    more."""
    blocks = [moe.block_kinds(cfg, indices) for indices in layers]
    first_with: dict[tuple[int, int], int] = {}
    for s in range(1, len(layers) - 1):
        first_with.setdefault(blocks[s], s)
    return sorted({0, len(layers) - 1, *first_with.values()})


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage `stage` holds at once under 1F1B (forward done, backward
    not yet): min(stages - stage, micro-batches)."""
    return min(pp - stage, micro_batches)


def pipe_buffers(pp: int, stage: int, micro_batches: int) -> int:
    """Input/output buffer slots DeepSpeed's pipeline engine keeps: TrainSchedule.num_pipe_buffers."""
    return max(2, in_flight(pp, stage, micro_batches))


def stage_activation_bytes(cfg: Config, shape: act.ActivationShape, stage: int, blocks_bytes: float) -> float:
    """Saved activations of one micro-batch on `stage`, whose decoder blocks keep `blocks_bytes`."""
    total = blocks_bytes
    if stage == 0:
        total += act.embedding_bytes(shape)
    if stage == cfg.parallel.pp - 1:
        total += act.final_norm_bytes(shape) + act.loss_bytes(shape)
    return total


def estimate_memory(
    cfg: Config,
    world_size: int,
    capacity: int,
    runtime: Runtime = CUDA,
    assumptions: Assumptions | None = None,
    stage_parameters: list[int] | None = None,
    all_stages: bool = True,
) -> MemoryPlan:
    """Memory of every pipeline stage of `cfg` laid out over `world_size` ranks (`stage_parameters`:
    `rank_parameters(cfg)`, when the caller has it already). With `all_stages` false only the stages
    that can be the worst are kept (see `candidate_worst_stages`), which is what a search needs."""
    a = assumptions or Assumptions()
    precision = planned_precision(cfg.train.precision, runtime)
    shape = act.ActivationShape.of(cfg, dtype_bytes(precision), runtime.attention_output_saved)
    layers, params = stage_layers(cfg), stage_parameters or rank_parameters(cfg)
    experts = rank_expert_parameters(cfg)
    wanted = range(len(layers)) if all_stages else candidate_worst_stages(cfg, layers)
    stages = [
        _stage_memory(cfg, world_size, s, layers[s], (params[s], experts[s]), precision, shape, runtime, a)
        for s in wanted
    ]
    worst = max(stages, key=lambda s: s.peak)
    reserve = a.runtime_reserve_bytes if runtime.empty_buffers_resident else 0
    return MemoryPlan(stages, precision, capacity, int(a.fragmentation * worst.peak), reserve)


def _stage_memory(
    cfg: Config,
    world_size: int,
    stage: int,
    indices: list[int],
    counts: tuple[int, int],
    precision: str,
    shape: act.ActivationShape,
    runtime: Runtime,
    a: Assumptions,
) -> StageMemory:
    """`counts`: this rank's parameters on the stage, and of them the routed experts'."""
    par, p = cfg.parallel, dtype_bytes(precision)
    (params, experts), dp = counts, cfg.data_parallel_size(world_size)
    edp = moe.expert_data_parallel_size(cfg, world_size)
    micro_batches = cfg.grad_accum_steps(world_size)
    dense_blocks, moe_blocks = moe.block_kinds(cfg, indices)
    flight = in_flight(par.pp, stage, micro_batches)
    by_mode = {
        mode: int(
            flight * stage_activation_bytes(cfg, shape, stage, _blocks_bytes(shape, mode, indices, cfg))
        )
        for mode in act.RECOMPUTE_MODES
    }
    mode = par.activation_checkpointing
    accumulate = cfg.train.grad_accum_dtype
    states = model_state_bytes(par.zero_stage, dp, precision, accumulate)
    expert_states = model_state_bytes(par.zero_stage, edp, precision, accumulate)
    working = _working(shape, stage == par.pp - 1, (dense_blocks, moe_blocks), mode)

    def state(field: str) -> int:
        dense_bytes, expert_bytes = getattr(states, field), getattr(expert_states, field)
        return int(dense_bytes * (params - experts) + expert_bytes * experts)

    return StageMemory(
        stage=stage,
        parameters=params,
        expert_parameters=experts,
        weights=state("weights"),
        gradients=state("gradients"),
        optimizer_states=state("optimizer"),
        activations=by_mode[mode],
        activations_by_mode=by_mode,
        in_flight=flight,
        pipeline_buffers=int(
            _pipeline_buffers(cfg, shape, stage, pipe_buffers(par.pp, stage, micro_batches))
        ),
        communication_buffers=int(_backward_buffers(cfg, indices, p, runtime, a)),
        working=int(working),
        step_extra=int(_step_extra(cfg, params, moe.partition(params, experts, dp, edp), p, runtime, a)),
        construction=int(_construction(cfg, indices, params, dp, p)),
    )


def _working(shape: act.ActivationShape, last: bool, kinds: tuple[int, int], mode: str) -> float:
    """Short-lived in a backward pass: the loss's or a block's gradients (the larger), plus, with
    recomputation, the block being recomputed (of the larger kind, dense or MoE)."""
    present = [moe_kind for moe_kind, n in zip((False, True), kinds, strict=True) if n]
    working = max(
        [act.loss_working_bytes(shape) if last else 0.0]
        + [act.block_working_bytes(shape, moe=kind) for kind in present]
    )
    recomputed = [
        act.block_bytes(shape, "none", kind) - act.block_bytes(shape, mode, kind) for kind in present
    ]
    return working + max(recomputed, default=0.0)


def _blocks_bytes(shape: act.ActivationShape, mode: str, indices: list[int], cfg: Config) -> float:
    """Saved activations of one micro-batch in the stage's decoder blocks, dense and MoE."""
    dense, moe_blocks = moe.block_kinds(cfg, indices)
    total = dense * act.block_bytes(shape, mode)
    return total + (moe_blocks * act.block_bytes(shape, mode, moe=True) if moe_blocks else 0.0)


def _construction(cfg: Config, indices: list[int], params: int, dp: int, p: int) -> float:
    """Building the rank's layers: in fp32, then flattened by DeepSpeed (a second copy in fp32); under
    ZeRO-3 each layer goes into this rank's partitions as soon as it is built (pretrain.parallel.zero3),
    so the partitions so far plus one whole fp32 layer, before its tensor-parallel slicing."""
    if cfg.parallel.zero_stage < 3:
        return 4 * params * (2 if p == 4 else 1)
    counts = layer_counts(cfg)
    return p * params / dp + 4 * max(counts[i].total for i in indices)


def _pipeline_buffers(cfg: Config, shape: act.ActivationShape, stage: int, slots: int) -> float:
    """DeepSpeed's pipe buffers: per slot the stage's input (cloned) and its output, split over TP
    ranks; plus one receive buffer and one gradient buffer."""
    pp = cfg.parallel.pp
    if pp == 1:
        return 0.0
    boundary = act.boundary_bytes(shape)
    held = (stage > 0) + (stage < pp - 1)  # input from the stage before, output to the stage after
    return slots * held * boundary + 2 * boundary


def _backward_buffers(cfg: Config, indices: list[int], p: int, runtime: Runtime, a: Assumptions) -> float:
    """DeepSpeed's gradient buckets during the backward pass, and ZeRO-3's gathered weights."""
    par = cfg.parallel
    buckets = 0.0
    if par.zero_stage in (1, 2) and par.pp == 1:
        buckets = 2 * a.reduce_bucket_elements * p  # overlap_comm double buffer
    elif par.zero_stage == 3:
        buckets = zero3_bucket_elements(cfg) * p  # sized to the model (deepspeed_config)
    total = buckets if runtime.empty_buffers_resident else 0.0
    if par.zero_stage == 3:
        # The layer being computed and the one prefetched, whole (not data-parallel partitioned).
        counts = layer_counts(cfg)
        largest = max(counts[i].per_rank(par.tp) for i in indices)
        total += min(a.stage3_max_live_elements, 2 * largest) * p
    return total


def _step_extra(
    cfg: Config, params: int, partition: float, p: int, runtime: Runtime, a: Assumptions
) -> float:
    """Gradient memory at the optimizer step and its temporaries (see the module docstring);
    `partition`: elements of this rank's ZeRO partition (pretrain.plan.experts.partition)."""
    stage = cfg.parallel.zero_stage
    if stage == 0 and p == 4:  # plain torch AdamW on the full gradients
        return p * params + (0 if runtime.fused_optimizer else 4 * params)
    extra = p * partition  # the gradient partition (ZeRO-1 copies it in at the boundary)
    if stage == 1:
        extra += p * partition  # ... and flattens it
    # ZeRO-3 steps its partition one sub-group at a time: the temporaries below are one sub-group's.
    stepped = min(partition, zero3_sub_group_size(int(partition))) if stage == 3 else partition
    if p < 4:
        extra += 4 * stepped  # converted to fp32 for the masters
    if not runtime.fused_optimizer:
        extra += 4 * stepped  # foreach AdamW: sqrt(exp_avg_sq) for what is stepped at once
    if stage == 1 and cfg.parallel.pp > 1 and runtime.empty_buffers_resident:
        extra += a.reduce_bucket_elements * p  # reduce_gradients(pipeline_parallel=True)
    return extra
