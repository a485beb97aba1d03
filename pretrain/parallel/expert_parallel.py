"""Expert parallelism: the routed experts of each MoE block split over `parallel.ep` data-parallel ranks.

Each rank of an expert-parallel group (DeepSpeed's, see `pretrain.deepspeed_compat.experts`) holds
num_experts / ep whole experts, a contiguous slice of the stacked weights: rank r holds experts
[r E/ep, (r+1) E/ep). The router and everything else stay replicated over the data-parallel ranks.
A block's forward on every rank:

1. route its own tokens (replicated router, so a token's choice does not depend on the layout);
2. group the (token, slot) pairs by expert, which groups them by the rank holding the expert;
3. exchange the per-expert counts, then the tokens, by all-to-all over the expert-parallel group;
4. run the local experts on what arrived (regrouped by local expert), and send the outputs back by
   the inverse all-to-all; the backward pass runs the same exchanges the other way;
5. weight and sum each token's k outputs in slot order, exactly as the single-process block does.

Gradients of expert weights are reduced over the expert-data-parallel group (the ranks holding the
same experts) by DeepSpeed, which partitions their ZeRO state there too.

Under tensor parallelism the routed experts are whole on every TP rank and each TP rank runs its
(identical) tokens through them; the shared experts are split like the dense MLP (docs/MOE.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain import deepspeed_compat as compat
from pretrain.model.moe import MixtureOfExperts, RoutedExperts, Routing, combine, sort_pairs, swiglu_experts

Group = Any


class _AllToAll(torch.autograd.Function):
    """Rows of `x` in blocks of `send` rows per rank out, blocks of `receive` rows per rank in; the
    backward pass sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], receive: list[int], group: Group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty(sum(receive), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], receive: list[int], group: Group) -> torch.Tensor:
    return _AllToAll.apply(x, send, receive, group)


class ExpertParallelExperts(nn.Module):
    """This rank's slice of a block's routed experts (same parameter names as `RoutedExperts`), and
    the exchange of tokens with the ranks holding the others."""

    gate_proj: nn.Parameter
    up_proj: nn.Parameter
    down_proj: nn.Parameter

    def __init__(self, experts: RoutedExperts, ep: int, ep_rank: int, group: Group):
        super().__init__()
        self.num_experts: int = experts.num_experts
        self.local: int = self.num_experts // ep
        self.ep, self.group = ep, group
        first = ep_rank * self.local
        held = experts.get_parameter("gate_proj").shape[0]
        if (experts.first_expert, held) not in ((first, self.local), (0, self.num_experts)):
            raise ValueError(
                f"expert-parallel rank {ep_rank} of {ep} needs experts [{first}, {first + self.local}); the block "
                f"holds [{experts.first_expert}, {experts.first_expert + held})"
            )
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(experts, name).data
            if held != self.local:  # built whole (a plain model): keep this rank's slice only
                weight = weight.narrow(0, first, self.local).clone()
            param = nn.Parameter(weight)
            compat.mark_expert_parameter(param, ep)
            setattr(self, name, param)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        pairs, order, counts = sort_pairs(routing, self.num_experts)
        send_counts = torch.tensor(counts, dtype=torch.int64).view(self.ep, self.local)
        received_counts = torch.empty_like(send_counts)
        self._exchange_counts(send_counts, received_counts, x.device)
        send = send_counts.sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        arrived = all_to_all(x[pairs[order]], send, receive, self.group)
        by_expert, per_expert = self._group_by_local_expert(received_counts)
        by_expert = by_expert.to(x.device)
        outputs = swiglu_experts(arrived[by_expert], per_expert, self.gate_proj, self.up_proj, self.down_proj)
        back = torch.empty_like(outputs).index_copy(0, by_expert, outputs)
        returned = all_to_all(back, receive, send, self.group)
        return combine(returned, order, routing, x)

    def _exchange_counts(self, send: torch.Tensor, receive: torch.Tensor, device: torch.device) -> None:
        """How many rows each rank sends each local expert of every other: one small exchange (the
        host needs the numbers to size the token exchange)."""
        sent, got = send.to(device), torch.empty_like(send, device=device)
        dist.all_to_all_single(got, sent, group=self.group)
        receive.copy_(got.cpu())

    def _group_by_local_expert(self, received: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Arrived rows come by source rank, then by local expert: the order that groups them by local
        expert instead (sources in rank order within each), and the rows per local expert."""
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), received.reshape(-1).cumsum(0)[:-1]])
        starts = starts.view(self.ep, self.local)
        pieces = [
            torch.arange(int(starts[s, e]), int(starts[s, e] + received[s, e]))
            for e in range(self.local)
            for s in range(self.ep)
        ]
        order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        return order, received.sum(0).tolist()


def apply_expert_parallel(layer: nn.Module, ep: int, ep_rank: int, group: Group) -> nn.Module:
    """Swap the routed experts of every MoE block in `layer` for this rank's slice of them."""
    if ep == 1:
        return layer
    for module in layer.modules():
        if isinstance(module, MixtureOfExperts) and isinstance(module.experts, RoutedExperts):
            module.experts = ExpertParallelExperts(module.experts, ep, ep_rank, group)
    return layer


def held_experts(num_experts: int, ep: int, ep_rank: int) -> tuple[int, int] | None:
    """(first, count) of the routed experts expert-parallel rank `ep_rank` holds; None: all of them."""
    if ep == 1 or num_experts == 0:
        return None
    local = num_experts // ep
    return ep_rank * local, local


def set_loss_gradient_scale(layers: list[nn.Module], micro_batches: int) -> None:
    """The balancing losses' gradient per micro-batch: 1 / micro-batches per step, as DeepSpeed
    divides the language-model loss by its gradient-accumulation steps."""
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, MixtureOfExperts):
                module.loss_gradient_scale = 1.0 / micro_batches


class ExpertWeights:
    """This rank's expert weights as a per-rank part of the checkpoint.

    DeepSpeed writes the module file from data-parallel rank 0 alone, which holds only its own slice
    of the experts; on a native resume every rank loads that file, and its ZeRO optimizer restores
    the right fp32 masters but copies them into the module only at the next step. So each rank saves
    its experts' module weights too and puts them back after DeepSpeed's load: the step after a
    resume runs with the same weights as the uninterrupted run.
    """

    def __init__(self, module: nn.Module):
        self.params = {n: p for n, p in module.named_parameters() if compat.is_expert_parameter(p)}

    def state_dict(self) -> dict[str, Any]:
        return {name: p.detach().cpu().clone() for name, p in self.params.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def start_fresh(self, step: int) -> None:
        """Nothing to derive: a resume in another layout (resharding) sets every expert's module
        weight from its fp32 master in the layout-free cache."""


def expert_weights(module: nn.Module) -> ExpertWeights | None:
    """The per-rank part for `module`'s expert-parallel weights, or None without expert parallelism."""
    part = ExpertWeights(module)
    return part if part.params else None
