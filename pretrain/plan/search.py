"""Enumerate layouts of one model and global batch on one cluster, keep those that the trainer accepts
and that fit, rank them by estimated tokens/s.

The space: tensor parallelism within a node (powers of two up to the GPUs per node), every pipeline
depth that divides the remaining ranks (up to the number of blocks), every ZeRO stage DeepSpeed allows
with it (0-1 with a pipeline, 1-3 without), micro-batches of 1, 2, 4, ... that divide the per-replica
batch, the three recomputation modes, sequence parallelism on or off when tp > 1, and for a mixture of
experts every expert-parallel degree that divides both the data-parallel size and the number of
experts (pretrain.config's own checks then refuse what the trainer refuses: ZeRO-0 with ep > 1,
ZeRO-3 and sequence parallelism with MoE). The model, the global batch, the sequence length and the
precision stay as configured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from pretrain.config import Config
from pretrain.plan.activations import RECOMPUTE_MODES
from pretrain.plan.hardware import Cluster
from pretrain.plan.planner import Plan, layout_problems, plan_layout, with_layout


@dataclass(frozen=True)
class SearchResult:
    evaluated: int  # layouts enumerated
    valid: int  # of those, accepted by the trainer's validation
    ranked: list[Plan]  # every valid layout that fits (with the headroom asked for), fastest first

    @property
    def fitting(self) -> int:
        return len(self.ranked)


def _powers_of_two(limit: int) -> list[int]:
    values, v = [], 1
    while v <= limit:
        values.append(v)
        v *= 2
    return values


def expert_parallel_degrees(cfg: Config, dp: int) -> list[int]:
    """Divisors of the data-parallel size that divide the number of experts (1 for a dense model)."""
    experts = cfg.model.moe.num_experts
    if not cfg.model.moe.enabled:
        return [1]
    return [ep for ep in range(1, dp + 1) if dp % ep == 0 and experts % ep == 0]


def candidate_layouts(cfg: Config, cluster: Cluster) -> Iterator[Config]:
    world, blocks = cluster.world_size, cfg.model.num_layers
    for tp in _powers_of_two(cluster.gpus_per_node):
        if world % tp:
            continue
        for pp in (d for d in range(1, min(blocks, world // tp) + 1) if (world // tp) % d == 0):
            dp = world // (tp * pp)
            per_replica = cfg.train.global_batch_size // dp
            for ep in expert_parallel_degrees(cfg, dp):
                for zero in (0, 1) if pp > 1 else (0, 1, 2, 3):
                    for micro in _powers_of_two(max(1, per_replica)):
                        for mode in RECOMPUTE_MODES:
                            for sp in (False, True) if tp > 1 else (False,):
                                yield with_layout(cfg, tp, pp, zero, micro, mode, sp, ep)


def search_layouts(cfg: Config, cluster: Cluster, headroom: float = 0.0) -> SearchResult:
    """Every candidate layout the trainer accepts and that needs at most (1 - headroom) of the GPU's
    memory, ranked."""
    limit = (1.0 - headroom) * cluster.gpu.memory_bytes
    evaluated = valid = 0
    fitting: list[Plan] = []
    for candidate in candidate_layouts(cfg, cluster):
        evaluated += 1
        if layout_problems(candidate, cluster.world_size):
            continue
        valid += 1
        plan = plan_layout(candidate, cluster, all_stages=False)
        if plan.fits and plan.memory.required <= limit:
            fitting.append(plan)
    fitting.sort(key=_rank_key)
    return SearchResult(evaluated, valid, fitting)


def _rank_key(plan: Plan) -> tuple[float, ...]:
    """Fastest first, in steps of 1% (finer differences are below what the model can tell apart);
    within a step the simpler layout: ZeRO-1 (this repository's default, tested in every layout), then
    0, 2, 3; less model parallelism; less expert parallelism; less recomputation; then the most memory
    to spare."""
    par = plan.cfg.parallel
    speed_step = math.floor(math.log(plan.step.tokens_per_s) / math.log(1.01))
    recompute = RECOMPUTE_MODES.index(par.activation_checkpointing)
    zero_preference = (1, 0, 2, 3).index(par.zero_stage)
    return (-speed_step, zero_preference, par.tp * par.pp, par.ep, recompute, plan.memory.required)
