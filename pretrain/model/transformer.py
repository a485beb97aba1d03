"""The decoder as an ordered list of layers: embedding, blocks..., final norm, output head.

The same list feeds a plain single-process run (`Transformer`) and DeepSpeed's `PipelineModule`
(pretrain.parallel builds each stage's layers with `build_layer`). Nothing here knows about
process groups.

Every layer draws its initial weights from its own generator, seeded by (seed, layer index), so the
weights do not depend on which process builds which layer: a pipeline stage or a tensor-parallel
shard starts from exactly the numbers the single-process model starts from.

The embedding and output rows are padded to `padded_vocab_size` (see `Config.padded_vocab_size`):
padded rows start at zero, are never looked up, and their logits are left out of the loss and of
`Transformer.forward`'s output, so padding changes neither the mathematics nor the gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.layers import DecoderBlock, RMSNorm
from pretrain.model.moe import RoutedExperts

IGNORE_INDEX = -100


class TokenEmbedding(nn.Module):
    def __init__(self, padded_vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(padded_vocab_size, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits through the transposed embedding (tied input and output embeddings)."""
        return F.linear(x, self.weight)


class OutputHead(nn.Module):
    """The projection from the residual stream to (padded) vocabulary logits."""

    def __init__(self, padded_vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(padded_vocab_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy over the real vocabulary (padded columns left out), in fp32.

    Also trims padded logits for callers that want them (`logits`). The tensor-parallel plan swaps
    this for a vocabulary-parallel version that never gathers the full logits.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits[..., : self.vocab_size], labels)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab_size]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not IGNORE_INDEX; computed in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def num_layers(cfg: ModelConfig) -> int:
    """Length of the layer list: embedding, num_layers blocks, final norm, output head."""
    return cfg.num_layers + 3


def layer_kind(cfg: ModelConfig, index: int) -> str:
    if index == 0:
        return "embedding"
    if index <= cfg.num_layers:
        return "block"
    return "norm" if index == cfg.num_layers + 1 else "head"


def layer_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator layer `index` draws its initial weights from (independent streams per layer)."""
    (state,) = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


def build_layer(
    cfg: ModelConfig,
    index: int,
    padded_vocab_size: int,
    seed: int,
    held_experts: tuple[int, int] | None = None,
) -> nn.Module:
    """Layer `index` of the list, initialised on the CPU from its own generator (or left uninitialised
    when built under `torch.device('meta')`, for counting and planning). `held_experts` (first,
    count): an MoE block holds only those routed experts, with the values the whole block gives them."""
    kind = layer_kind(cfg, index)
    layer: nn.Module
    if kind == "embedding":
        layer = TokenEmbedding(padded_vocab_size, cfg.hidden_size)
    elif kind == "block":
        layer = DecoderBlock(cfg, cfg.is_moe_block(index - 1), held_experts)
    elif kind == "norm":
        layer = RMSNorm(cfg.hidden_size, cfg.norm_eps)
    else:
        layer = OutputHead(padded_vocab_size, cfg.hidden_size)
    if next(layer.parameters()).device.type != "meta":
        init_layer(layer, cfg, layer_generator(seed, index))
        init_routed_experts(layer, cfg, seed, index)
    return layer


def _scaled_std(cfg: ModelConfig, projection: str) -> float:
    """init_std, or init_std / sqrt(2 L) for the residual-output projections (GPT-2, Radford et al.
    2019; Megatron-LM's `scaled_init_method_normal`)."""
    return (
        cfg.init_std / math.sqrt(2 * cfg.num_layers)
        if projection in ("o_proj", "down_proj")
        else cfg.init_std
    )


@torch.no_grad()
def init_layer(layer: nn.Module, cfg: ModelConfig, generator: torch.Generator) -> None:
    """Normal(0, init_std) for matrices, drawn in a fixed order; residual-output projections scaled;
    norms at 1; padded vocabulary rows at 0. Routed experts are left to `init_routed_experts`."""
    for name, param in layer.named_parameters():
        if param.ndim == 1:
            param.fill_(1.0)
            continue
        if param.ndim == 3:  # stacked routed experts, (experts, out, in)
            continue
        std = _scaled_std(cfg, name.split(".")[-2] if "." in name else name)
        rows = cfg.vocab_size if isinstance(layer, TokenEmbedding | OutputHead) else param.shape[0]
        param.zero_()
        values = torch.empty(rows, *param.shape[1:]).normal_(0.0, std, generator=generator)
        param[:rows].copy_(values)


@torch.no_grad()
def init_routed_experts(layer: nn.Module, cfg: ModelConfig, seed: int, index: int) -> None:
    """Each routed expert's matrices from a generator of its own (seed, layer, expert, projection):
    a rank holding a slice of the experts draws only those, and gets the values the whole block has."""
    for module in layer.modules():
        if not isinstance(module, RoutedExperts):
            continue
        first = module.first_expert
        for position, projection in enumerate(("gate_proj", "up_proj", "down_proj")):
            stacked = module.get_parameter(projection)
            std = _scaled_std(cfg, projection)
            for row in range(stacked.shape[0]):
                key = [seed, index, first + row, position]
                (state,) = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)
                generator = torch.Generator().manual_seed(int(state))
                stacked[row].normal_(0.0, std, generator=generator)


class Transformer(nn.Module):
    """Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

    Built whole from `cfg` and `seed`, or assembled from `layers` (the full list, e.g. with tensor-
    parallel shards from pretrain.parallel) and a matching `loss`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        padded_vocab_size: int | None = None,
        seed: int = 0,
        layers: list[nn.Module] | None = None,
        loss: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size or cfg.padded_vocab_size(tensor_parallel=1)
        if layers is None:
            layers = [build_layer(cfg, i, self.padded_vocab_size, seed) for i in range(num_layers(cfg))]
        assert len(layers) == num_layers(cfg), f"expected {num_layers(cfg)} layers, got {len(layers)}"
        self.embedding = layers[0]
        self.blocks = nn.ModuleList(layers[1:-2])
        self.norm = layers[-2]
        self.head = layers[-1]
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        self.loss = loss if loss is not None else CausalLMLoss(cfg.vocab_size)

    def layers(self) -> list[nn.Module]:
        return [self.embedding, *self.blocks, self.norm, self.head]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the real vocabulary, (batch, seq, vocab_size); with `labels`, the mean
        next-token cross-entropy instead."""
        x = tokens
        for layer in self.layers():
            x = layer(x)
        return self.loss.logits(x) if labels is None else self.loss(x, labels)  # type: ignore[operator]
