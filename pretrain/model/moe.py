"""The mixture-of-experts MLP: a router, routed SwiGLU experts, optional shared experts. Plain torch.

    y = shared(x) + sum over the k selected experts e of w_e(x) * expert_e(x)

Router (fp32 whatever the training precision, as DeepSeek-V3 and Megatron-Core compute it): logits
x W_r^T; scores softmax(logits) or sigmoid(logits); the k experts with the highest score (+ the
auxiliary-loss-free bias, for the choice only) are selected; their scores, optionally divided by their
sum, times route_scale, weight the outputs.

Load balancing, added to the gradient without touching the language-model loss the run reports
(`add_loss_gradient`, Megatron-Core's MoEAuxLossAutoScaler idea), so it works on every pipeline stage:
- auxiliary loss (Switch Transformer, Fedus et al. 2021, eq. 4, per sequence as DeepSeek-V3's
  sequence-wise loss): E / (k T) * sum_i count_i * P_i, P_i the mean probability of expert i over the
  sequence's T tokens (sigmoid scores normalised to sum to 1), averaged over sequences. Per sequence,
  so its value and gradient do not depend on how sequences are grouped into micro-batches or ranks;
- router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2;
- auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): `expert_bias` (a buffer, saved with
  the weights) is moved by bias_update_rate towards balance after every step, by the trainer
  (`pretrain.train.callbacks.moe`), from the load measured over all ranks.

The experts hold their weights stacked, (experts, out, in), so expert parallelism can slice the first
dimension. `RoutedExperts` computes every expert here, one matmul per expert (exact, any device);
pretrain.parallel.expert_parallel swaps it for a version that holds a slice of the experts and sends
tokens to their ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig

ExpertSlice = tuple[int, int]  # (first expert, how many): the routed experts a rank holds


class AddLossGradient(torch.autograd.Function):
    """Returns `x` unchanged; in the backward pass also starts `loss`'s backward (with gradient 1)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones(ctx.loss_shape, device=grad.device, dtype=torch.float32)


def add_loss_gradient(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    if not loss.requires_grad:
        return x
    return AddLossGradient.apply(x, loss)


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation recomputation re-running a block
    (statistics must not be counted twice)."""
    return torch._C._current_graph_task_id() != -1


class Routing:
    """The router's decision for N tokens: expert index and weight of each (token, slot), and which
    pairs go through (all of them unless a capacity drops some)."""

    def __init__(self, experts: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor | None):
        self.experts, self.weights, self.kept = experts, weights, kept  # (N, k), (N, k) fp32, (N, k) bool


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.score_func, self.normalize, self.scale = moe.score_func, moe.normalize_top_k, moe.route_scale
        self.capacity_factor = None if moe.dropless else moe.capacity_factor
        self.weight = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> routing, the fp32 logits (N, E) and the scores (N, E)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores.detach() + self.get_buffer("expert_bias"), self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scale
        return Routing(chosen, weights, self._capacity_mask(chosen)), logits, scores

    def _capacity_mask(self, chosen: torch.Tensor) -> torch.Tensor | None:
        """With a capacity: each expert keeps its first `capacity` (token, slot) pairs in token order."""
        if self.capacity_factor is None:
            return None
        tokens = chosen.shape[0]
        capacity = math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)
        one_hot = F.one_hot(chosen.reshape(-1), self.num_experts)
        position = one_hot.cumsum(0).mul_(one_hot).sum(-1) - 1  # place of each pair in its expert's queue
        return (position < capacity).view_as(chosen)


def swiglu_experts(
    x: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Rows of `x` grouped by expert (counts[e] rows for expert e, in order) through their expert's
    SwiGLU; weights stacked (experts, out, in). One matmul per expert: exact on every device.
    (On GPU in bf16 `torch._grouped_mm` does the same in one kernel.)"""
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and x.shape[0] > 0:
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        hidden = F.silu(torch._grouped_mm(x, gate.transpose(-2, -1), offs=offsets))
        hidden = hidden * torch._grouped_mm(x, up.transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(hidden, down.transpose(-2, -1), offs=offsets)
    outputs = []
    for expert, rows in enumerate(x.split(counts)):
        outputs.append(
            F.linear(F.silu(F.linear(rows, gate[expert])) * F.linear(rows, up[expert]), down[expert])
        )
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


class RoutedExperts(nn.Module):
    """Every routed expert of the block, computed here: (N, hidden) tokens and their routing in,
    the weighted sum of their k experts' outputs out."""

    def __init__(self, num_experts: int, hidden: int, width: int, held: ExpertSlice | None = None):
        super().__init__()
        # `held` (first, count): only those experts' weights exist here, so an expert-parallel rank
        # never allocates the others' (384 experts of Kimi K2's width are 68 GB per block in fp32).
        # pretrain.parallel.expert_parallel then computes with them; this module alone cannot.
        self.num_experts = num_experts
        self.first_expert, count = held if held is not None else (0, num_experts)
        self.gate_proj = nn.Parameter(torch.empty(count, width, hidden))
        self.up_proj = nn.Parameter(torch.empty(count, width, hidden))
        self.down_proj = nn.Parameter(torch.empty(count, hidden, width))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        assert self.gate_proj.shape[0] == self.num_experts, "a slice of the experts computes under EP only"
        pairs, order, counts = sort_pairs(routing, self.gate_proj.shape[0])
        outputs = swiglu_experts(x[pairs[order]], counts, self.gate_proj, self.up_proj, self.down_proj)
        return combine(outputs, order, routing, x)


def sort_pairs(routing: Routing, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The (token, slot) pairs that go through, as token indices (`pairs`, in (token, slot) order), the
    stable order that groups them by expert, and how many each expert gets."""
    tokens, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    pairs = torch.arange(tokens * k, device=flat.device)
    if routing.kept is not None:
        pairs = pairs[routing.kept.reshape(-1)]
        flat = flat[pairs]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return pairs // k, order, counts


def combine(outputs: torch.Tensor, order: torch.Tensor, routing: Routing, x: torch.Tensor) -> torch.Tensor:
    """Expert outputs (in expert-sorted order) back to (token, slot), weighted and summed over slots in
    slot order (the same sum whichever rank computed each output)."""
    tokens, k = routing.experts.shape
    per_pair = outputs.new_zeros(tokens * k, outputs.shape[-1])
    slots = torch.arange(tokens * k, device=x.device)
    if routing.kept is not None:
        slots = slots[routing.kept.reshape(-1)]
    per_pair = per_pair.index_copy(0, slots[order], outputs)
    weighted = per_pair.view(tokens, k, -1) * routing.weights.unsqueeze(-1).to(outputs.dtype)
    return weighted.sum(1).to(x.dtype)


class SharedExperts(nn.Module):
    """num_shared_experts always-on experts as one SwiGLU of their summed width (DeepSeek-MoE)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEStatistics:
    """What the blocks measured since the trainer last read it (training forwards only, each once)."""

    def __init__(self, num_experts: int):
        # On the host whatever device the module is built under (a model built on the meta device
        # and materialised later would otherwise keep a meta counter).
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.float64, device="cpu")
        # Device tensors once a forward has added to them (read on the host once per step).
        self.aux_loss: torch.Tensor | float = 0.0
        self.z_loss: torch.Tensor | float = 0.0
        self.dropped: torch.Tensor | float = 0.0
        self.forwards = 0


class MixtureOfExperts(nn.Module):
    """The MLP of an MoE decoder block. (batch, seq, hidden) in and out."""

    def __init__(self, cfg: ModelConfig, held_experts: ExpertSlice | None = None):
        super().__init__()
        moe = cfg.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.aux_loss_coeff, self.z_loss_coeff = moe.aux_loss_coeff, moe.z_loss_coeff
        self.router = Router(cfg)
        self.experts: nn.Module = RoutedExperts(
            moe.num_experts, cfg.hidden_size, cfg.expert_ffn_size, held_experts
        )
        width = moe.num_shared_experts * cfg.expert_ffn_size
        self.shared = SharedExperts(cfg.hidden_size, width) if width else None
        # The balancing losses' gradient per micro-batch: 1 / (micro-batches per step), set by
        # pretrain.parallel, as DeepSpeed scales the language-model loss.
        self.loss_gradient_scale = 1.0
        self.statistics = MoEStatistics(moe.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(batch * seq, hidden)
        routing, logits, scores = self.router(flat)
        out = self.experts(flat, routing)
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.view(batch, seq, hidden)
        if not (self.training and torch.is_grad_enabled()):
            return out
        aux, z_loss = self._balancing_losses(routing, logits, scores, batch)
        if not recomputing():
            self._record(routing, aux, z_loss)
        penalty = self.aux_loss_coeff * aux + self.z_loss_coeff * z_loss
        return add_loss_gradient(out, penalty * self.loss_gradient_scale)

    def _balancing_losses(
        self, routing: Routing, logits: torch.Tensor, scores: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        experts, k = self.num_experts, self.top_k
        chosen = routing.experts.view(batch, -1)  # (batch, seq x k)
        counts = torch.zeros(batch, experts, device=chosen.device).scatter_add_(
            1, chosen, torch.ones_like(chosen, dtype=torch.float32)
        )
        probs = scores if self.router.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        mean_probs = probs.view(batch, -1, experts).mean(1)
        seq = probs.shape[0] // batch
        aux = (experts / (k * seq)) * (counts * mean_probs).sum(-1).mean()
        z_loss = torch.logsumexp(logits, -1).square().mean()
        return aux, z_loss

    @torch.no_grad()
    def _record(self, routing: Routing, aux: torch.Tensor, z_loss: torch.Tensor) -> None:
        stats = self.statistics
        chosen = routing.experts if routing.kept is None else routing.experts[routing.kept]
        counts = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        stats.tokens_per_expert = stats.tokens_per_expert.to(counts.device) + counts
        stats.aux_loss += aux.detach()
        stats.z_loss += z_loss.detach()
        if routing.kept is not None:
            stats.dropped += (~routing.kept).sum()
        stats.forwards += 1

    def take_statistics(self) -> MoEStatistics:
        stats, self.statistics = self.statistics, MoEStatistics(self.num_experts)
        return stats
