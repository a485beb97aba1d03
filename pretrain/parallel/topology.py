"""The DP x TP x PP layout of the processes and the groups each rank talks in.

Ranks are laid out by DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model with the
model axis varying fastest), so the ranks of a tensor-parallel group are neighbours (one node's
NVLink) and a data-parallel group spans nodes. The same topology object is handed to DeepSpeed,
which then shards ZeRO state over the data-parallel group only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from pretrain.config import Config


@dataclass
class ParallelContext:
    """This rank's place in the layout, and the process groups its layers need."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    sequence_parallel: bool
    topology: Any = None  # deepspeed's PipeModelDataParallelTopology (None for a single process)
    grid: Any = None  # deepspeed's PipelineParallelGrid: DeepSpeed's `mpu` (None without TP or PP)
    tp_group: Any = None  # torch ProcessGroup of this rank's tensor-parallel peers (None when tp == 1)
    ep: int = 1  # expert-parallel degree (taken from the data-parallel ranks)
    ep_rank: int = 0
    ep_group: Any = None  # DeepSpeed's expert-parallel group of this rank (None when ep == 1)
    expert_dp_group: Any = None  # the ranks holding the same experts (None when ep == 1)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def dp_group(self) -> Any:
        """Ranks holding copies of the same parameters (the same stage and TP shard)."""
        return self.grid.get_data_parallel_group() if self.grid is not None else dist.group.WORLD

    @property
    def model_parallel_group(self) -> Any:
        """Ranks holding different parts of the same model replica (all stages and TP shards of one
        data-parallel index): the group a global gradient norm is summed over."""
        return None if self.grid is None else self.grid.get_model_parallel_group()


def describe_layout(
    dp: int, tp: int, pp: int, zero_stage: int | None = None, precision: str | None = None, ep: int = 1
) -> str:
    """The one way a layout is written for people: 'data-parallel 2 x tensor-parallel 1 x
    pipeline-parallel 1[, experts over 2 data-parallel ranks][, ZeRO-1][, bf16]'."""
    parts = [f"data-parallel {dp} x tensor-parallel {tp} x pipeline-parallel {pp}"]
    if ep > 1:
        parts.append(f"expert-parallel {ep} (experts over {ep} of the data-parallel ranks)")
    if zero_stage is not None:
        parts.append(f"ZeRO-{zero_stage}")
    if precision is not None:
        parts.append(precision)
    return ", ".join(parts)


def build_parallel_context(cfg: Config, rank: int, world_size: int) -> ParallelContext:
    """Lay out the world; collective over all ranks (every rank creates every group, in one order)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = cfg.data_parallel_size(world_size)
    assert tp * pp * dp == world_size, "layout validated by pretrain.config before we get here"
    sequence_parallel = cfg.parallel.sequence_parallel and tp > 1
    if tp == 1 and pp == 1:
        return _with_experts(ParallelContext(1, 1, dp, 0, 0, rank, False), cfg.parallel.ep)
    from pretrain.deepspeed_compat import pipeline_grid, tensor_parallel_group

    topology, grid = pipeline_grid(pp, tp, dp)
    coord = topology.get_coord(rank)
    context = ParallelContext(
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=coord.model,
        pp_rank=coord.pipe,
        dp_rank=coord.data,
        sequence_parallel=sequence_parallel,
        topology=topology,
        grid=grid,
        tp_group=tensor_parallel_group(grid) if tp > 1 else None,
    )
    return _with_experts(context, cfg.parallel.ep)


def _with_experts(ctx: ParallelContext, ep: int) -> ParallelContext:
    """`ctx` with DeepSpeed's expert-parallel group of degree `ep` (collective over all ranks)."""
    if ep == 1:
        return ctx
    from pretrain.deepspeed_compat import create_expert_groups

    ctx.ep_group, ctx.expert_dp_group = create_expert_groups(ep, ctx.grid)
    ctx.ep = ep
    ctx.ep_rank = dist.get_rank(group=ctx.ep_group)
    # Checkpoint readers find EP rank e's experts in the files of data-parallel ranks e, e + ep, ...
    # (pretrain.checkpoint.optimizer_files): DeepSpeed's expert-then-data layout, checked here.
    expected = (ctx.dp_rank % ep, ctx.dp_rank // ep)
    if (ctx.ep_rank, dist.get_rank(group=ctx.expert_dp_group)) != expected:
        from pretrain.deepspeed_compat import DeepSpeedIncompatible

        raise DeepSpeedIncompatible(
            f"expert-parallel layout placing data-parallel rank {ctx.dp_rank} at expert-parallel rank "
            f"{expected[0]}, expert-data-parallel rank {expected[1]}",
            "expert groups",
        )
    return ctx


def single_process_context() -> ParallelContext:
    return ParallelContext(1, 1, 1, 0, 0, 0, False)
