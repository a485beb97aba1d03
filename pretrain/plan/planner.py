"""One layout, planned: exact size, memory per GPU, step time, and whether it fits.

`plan_layout` takes a config that pretrain.config and pretrain.parallel.layout have already validated
for the cluster's world size (the same checks the trainer runs), so an impossible layout never gets
this far.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

from pretrain.config import Config, RecomputeMode, ZeroStage, validate
from pretrain.model.flops import flops_per_token
from pretrain.parallel.layout import layout_problems as model_layout_problems
from pretrain.plan.counts import parameter_count, rank_parameters, stage_layers
from pretrain.plan.hardware import Cluster
from pretrain.plan.memory import CUDA, MemoryPlan, estimate_memory, planned_precision
from pretrain.plan.performance import StepEstimate, estimate_step


@dataclass(frozen=True)
class Plan:
    cfg: Config
    cluster: Cluster
    parameters: int
    flops_per_token: int
    memory: MemoryPlan
    step: StepEstimate

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def precision(self) -> str:
        return self.memory.precision

    def layout(self) -> dict[str, Any]:
        cfg, world = self.cfg, self.cluster.world_size
        par = cfg.parallel
        return {
            "tp": par.tp,
            "pp": par.pp,
            "dp": cfg.data_parallel_size(world),
            "ep": par.ep,
            "expert_data_parallel": cfg.data_parallel_size(world) // par.ep,
            "zero_stage": par.zero_stage,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum_steps": cfg.grad_accum_steps(world),
            "activation_checkpointing": par.activation_checkpointing,
            "sequence_parallel": par.sequence_parallel and par.tp > 1,
            "precision": self.precision,
            "global_batch_size": cfg.train.global_batch_size,
            "seq_len": cfg.train.seq_len,
            "pipeline_stage_layers": [len(s) for s in stage_layers(cfg)],
        }

    def overrides(self) -> list[str]:
        """The dotted overrides that select this layout on the command line."""
        par, train = self.cfg.parallel, self.cfg.train
        experts = [f"parallel.ep={par.ep}"] if self.cfg.model.moe.enabled else []
        return [
            f"parallel.tp={par.tp}",
            f"parallel.pp={par.pp}",
            *experts,
            f"parallel.zero_stage={par.zero_stage}",
            f"parallel.activation_checkpointing={par.activation_checkpointing}",
            f"parallel.sequence_parallel={'true' if par.sequence_parallel else 'false'}",
            f"train.micro_batch_size={train.micro_batch_size}",
        ]


def plan_layout(cfg: Config, cluster: Cluster, all_stages: bool = True) -> Plan:
    """Plan `cfg` (validated for `cluster.world_size`) on `cluster`; `all_stages` false keeps only the
    stages that can need the most memory (for searches)."""
    params = rank_parameters(cfg)
    return Plan(
        cfg=cfg,
        cluster=cluster,
        parameters=parameter_count(cfg),
        flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
        memory=estimate_memory(
            cfg, cluster.world_size, cluster.gpu.memory_bytes, CUDA, cluster.assumptions, params, all_stages
        ),
        step=estimate_step(cfg, cluster, params),
    )


def with_layout(
    cfg: Config,
    tp: int,
    pp: int,
    zero_stage: int,
    micro_batch_size: int,
    activation_checkpointing: str,
    sequence_parallel: bool,
    ep: int = 1,
) -> Config:
    """`cfg` with another layout (gradient accumulation re-derived from the global batch)."""
    # The casts only tell mypy: an unknown stage or mode is reported by layout_problems, as for any config.
    parallel = dataclasses.replace(
        cfg.parallel,
        tp=tp,
        pp=pp,
        zero_stage=cast(ZeroStage, zero_stage),
        activation_checkpointing=cast(RecomputeMode, activation_checkpointing),
        sequence_parallel=sequence_parallel,
        ep=ep,
    )
    train = dataclasses.replace(cfg.train, micro_batch_size=micro_batch_size, grad_accum_steps=None)
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def layout_problems(cfg: Config, world_size: int) -> list[str]:
    """Why the trainer would refuse `cfg` on `world_size` ranks: pretrain.config's validation and the
    split into pipeline stages (pretrain.parallel.layout), each only once the checks before it pass, plus
    the refusals once the precision is known: pretrain/parallel/engine.py's data-type check for a resolved
    'auto' (bf16 with fp32 accumulation under a pipeline needs ZeRO-1) and pretrain/train/build.py's (bf16
    without ZeRO and without a pipeline accumulates gradients in bf16)."""
    problems = validate(cfg, world_size) or model_layout_problems(cfg, world_size)
    precision = planned_precision(cfg.train.precision, CUDA)
    if not problems and cfg.train.precision == "auto":
        problems += cfg.parallel.data_type_problems(cfg.train, precision)
    if not problems and precision == "bf16" and cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1:
        problems.append(
            "bf16 with parallel.zero_stage=0 is refused by the trainer (gradients would be accumulated and "
            "all-reduced in bf16); use parallel.zero_stage=1"
        )
    return problems
