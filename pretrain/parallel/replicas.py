"""Replica-consistency check: parameters that several ranks hold copies of must stay equal.

Data-parallel replicas hold the same weights; tensor-parallel ranks hold the same norm weights
(whatever is not split); the first and last pipeline stage hold the same tied embedding. A
nondeterministic kernel, a missed all-reduce or a rank that skipped a step makes copies drift apart
silently, and the model quietly becomes several models. Every `parallel.check_replicas_interval`
steps each rank fingerprints its copies (float64 sum and sum of squares per parameter: two numbers
each, one all-gather per group) and the parameters that differ are reported by name.

The fingerprints are computed where the parameters live and only they travel: over an NCCL group as
a CUDA tensor (NCCL cannot send host memory), over gloo from host memory; the parameters themselves
never leave the device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain import deepspeed_compat as compat
from pretrain.parallel.distributed import collective_device
from pretrain.parallel.topology import ParallelContext

# Elements per piece: the float64 copy a fingerprint needs stays within 128 MiB of device memory,
# however large the parameter (a 175B embedding shard would otherwise take 5 GiB at once).
_PIECE = 1 << 24


def _fingerprint(param: torch.Tensor) -> torch.Tensor:
    """float64 sum and sum of squares of `param`, on its device."""
    total = torch.zeros(2, dtype=torch.float64, device=param.device)
    for piece in param.detach().reshape(-1).split(_PIECE):
        x = piece.double()
        total += torch.stack([x.sum(), x.square().sum()])
    return total


def _fingerprints(params: list[tuple[str, nn.Parameter]], device: torch.device) -> torch.Tensor:
    rows = [_fingerprint(p) for _, p in params]
    return torch.stack(rows).to(device) if rows else torch.zeros(0, 2, dtype=torch.float64, device=device)


def gathered_fingerprints(params: list[tuple[str, nn.Parameter]], group: Any) -> torch.Tensor:
    """Every rank's fingerprints of `params` over `group`, (ranks, params, 2) in host memory: the
    comparison reads them on the host, so one copy here instead of a device sync per parameter."""
    mine = _fingerprints(params, collective_device(group))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return torch.stack(everyone).cpu()


def _differing(params: list[tuple[str, nn.Parameter]], group: Any, kind: str) -> list[str]:
    """Names of `params` whose fingerprint differs between the ranks of `group`."""
    if group is None or dist.get_world_size(group) == 1 or not params:
        return []
    stacked = gathered_fingerprints(params, group)
    spread = (stacked.max(dim=0).values - stacked.min(dim=0).values).abs()
    scale = stacked.abs().max(dim=0).values.clamp(min=1e-30)
    problems = []
    for index, (name, _) in enumerate(params):
        if spread[index].max() > 0:
            relative = float((spread[index] / scale[index]).max())
            problems.append(
                f"{name}: {kind} copies differ (relative difference of fingerprints {relative:.1e})"
            )
    return problems


def check_replicas(module: nn.Module, ctx: ParallelContext) -> list[str]:
    """Every replicated parameter that is not equal on all ranks holding a copy; [] when consistent.
    Collective over the world: every rank must call it at the same step."""
    # ZeRO-3 parameters are partitioned: each rank holds a different piece.
    named = [(n, p) for n, p in module.named_parameters() if not compat.is_zero3_partitioned(p)]
    # Expert slices are copies only over the ranks holding the same experts (expert-data-parallel).
    experts = [(n, p) for n, p in named if compat.is_expert_parameter(p)]
    dense = [(n, p) for n, p in named if not compat.is_expert_parameter(p)]
    problems = _differing(dense, ctx.dp_group, "data-parallel")
    problems += _differing(experts, ctx.expert_dp_group, "expert-data-parallel")
    replicated = [(n, p) for n, p in named if not compat.is_tensor_parallel(p)]
    problems += _differing(replicated, ctx.tp_group, "tensor-parallel")
    for name, param, group in compat.tied_weights(module):
        problems += _differing([(f"tied {name}", param)], group, "pipeline-stage (tied)")
    return problems
