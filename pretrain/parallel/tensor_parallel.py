"""Megatron-style tensor parallelism: the communication functions and the layers built on them.

Shoeybi et al. 2019 (Megatron-LM) for the column/row split of attention and MLP, Korthikanti et al.
2022 for sequence parallelism. Four autograd functions move activations in and out of a
tensor-parallel region; each is the other's transpose, so forward and backward communicate the
same volume:

    copy_to_region        forward identity        backward all-reduce
    reduce_from_region    forward all-reduce      backward identity
    gather_sequence       forward all-gather(seq) backward reduce-scatter(seq)   (sequence parallel)
    scatter_sequence      forward reduce-scatter  backward all-gather(seq)       (sequence parallel)

Activations are (batch, seq, hidden); with sequence parallelism every rank holds seq / tp positions
between regions. Sharded parameters carry `tensor_model_parallel = True` (DeepSpeed's marker, so its
gradient norm sums them over TP ranks) and `partition_dim`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain import deepspeed_compat as compat
from pretrain.model.layers import rms_normalize
from pretrain.model.transformer import IGNORE_INDEX

Group = Any  # a torch ProcessGroup


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over ranks, then keep this rank's slice of `dim`."""
    world = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, 1, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, 1, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterSequence.apply(x, group)


def shard(tensor: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous 1/world of `tensor` along `dim` (a copy, so the full tensor can go)."""
    size = tensor.shape[dim] // world
    return tensor.narrow(dim, rank * size, size).clone()


def _sharded_parameter(data: torch.Tensor, partition_dim: int) -> nn.Parameter:
    param = nn.Parameter(data)
    compat.mark_tensor_parallel(param)
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    return param


class _TensorParallel(nn.Module):
    def __init__(self, group: Group, sequence_parallel: bool):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or sequence-sharded) activations into a region that needs all of them."""
        return gather_sequence(x, self.group) if self.sequence_parallel else copy_to_region(x, self.group)

    def _leave(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sums out of a region: summed, and with sequence parallelism sliced by sequence."""
        return (
            scatter_sequence(x, self.group) if self.sequence_parallel else reduce_from_region(x, self.group)
        )


class ColumnParallelLinear(_TensorParallel):
    """y = x W^T with W's output rows split over ranks: the output stays split (no gather)."""

    def __init__(self, weight: torch.Tensor, group: Group, sequence_parallel: bool):
        super().__init__(group, sequence_parallel)
        self.weight = _sharded_parameter(weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._enter(x), self.weight)


class RowParallelLinear(_TensorParallel):
    """y = x W^T with W's input columns split over ranks (x arrives split the same way); partial
    products are summed over ranks."""

    def __init__(self, weight: torch.Tensor, group: Group, sequence_parallel: bool):
        super().__init__(group, sequence_parallel)
        self.weight = _sharded_parameter(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._leave(F.linear(x, self.weight))


class VocabParallelEmbedding(_TensorParallel):
    """Embedding rows [start, start + rows) on this rank; other tokens contribute zeros, and the sum
    over ranks gives every token its row. `project` is the tied output layer (column-parallel)."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group: Group, sequence_parallel: bool):
        super().__init__(group, sequence_parallel)
        self.weight = _sharded_parameter(weight, 0)
        self.vocab_start = vocab_start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self._leave(rows.masked_fill(outside.unsqueeze(-1), 0.0))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._enter(x), self.weight)


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm on a slice of the sequence: each rank sees only its positions, so the weight's gradient
    is summed over the tensor-parallel group (in the backward of `copy_to_region`)."""

    def __init__(self, weight: torch.Tensor, eps: float, group: Group):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps, self.group = eps, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_region(self.weight, self.group) * rms_normalize(x, self.eps)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy from logits split by vocabulary (N, V/tp) without gathering them:
    three all-reduces of N numbers (max, target logit, sum of exponentials). Columns at or past
    `vocab_size` (padding) get probability 0."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int, group: Group
    ) -> torch.Tensor:
        logits = logits.float().clone()
        local_vocab = logits.shape[-1]
        real = max(0, min(local_vocab, vocab_size - vocab_start))
        if real < local_vocab:
            logits[:, real:] = float("-inf")
        max_logit = logits.max(dim=-1).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(max_logit.unsqueeze(-1))

        valid = labels != IGNORE_INDEX
        local_label = labels - vocab_start
        here = valid & (local_label >= 0) & (local_label < local_vocab)
        local_label = local_label.masked_fill(~here, 0)
        target = logits.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)
        dist.all_reduce(target, group=group)

        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        count = valid.sum()
        loss = ((sum_exp.log() - target) * valid).sum() / count

        exp.div_(sum_exp.unsqueeze(-1))  # now the softmax
        ctx.save_for_backward(exp, local_label, here, valid, count)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_label, here, valid, count = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        softmax[rows, local_label] -= here.to(softmax.dtype)
        softmax.mul_((valid.to(softmax.dtype) * (grad / count)).unsqueeze(-1))
        return softmax, None, None, None, None


class VocabParallelCausalLMLoss(nn.Module):
    """Drop-in for `CausalLMLoss` when the output layer is column-parallel over the vocabulary."""

    def __init__(self, vocab_size: int, vocab_start: int, group: Group):
        super().__init__()
        self.vocab_size, self.vocab_start, self.group = vocab_size, vocab_start, group

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        return _VocabParallelCrossEntropy.apply(
            flat, labels.reshape(-1), self.vocab_start, self.vocab_size, self.group
        )

    @torch.no_grad()
    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The full logits over the real vocabulary, gathered from every rank (for evaluation and
        generation; training never needs them)."""
        return _all_gather(logits, logits.ndim - 1, self.group)[..., : self.vocab_size]
