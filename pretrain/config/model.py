"""`model.*`: the shape of the Llama-style decoder, the sizes derived from it, and its own checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.config.fields import documented, positive
from pretrain.config.moe import MoEConfig


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder."""

    vocab_size: int = documented(
        "Rows of the embedding and output layer; at least the tokenizer's vocabulary.", 32000
    )
    hidden_size: int = documented("Width of the residual stream (d_model).", 768)
    num_layers: int = documented("Number of decoder blocks.", 12)
    num_heads: int = documented("Attention (query) heads.", 12)
    num_kv_heads: int | None = documented(
        "Key/value heads for grouped-query attention; null means num_heads (plain multi-head).", None
    )
    head_dim: int | None = documented(
        "Width of each attention head; null means hidden_size / num_heads. Qwen3 and Kimi K2 use 128 with "
        "hidden_size / num_heads of 64 and 112 (q_proj then maps hidden_size to num_heads x head_dim).",
        None,
    )
    qk_norm: bool = documented(
        "RMSNorm over each head's query and key (one weight of head_dim each) before the rotary embedding, "
        "as Qwen3, OLMo 2 and GLM-4.5 do: keeps attention logits bounded in long runs.",
        False,
    )
    ffn_hidden_size: int | None = documented(
        "Inner width of the SwiGLU MLP; null derives Llama's rule: 8/3 x hidden, rounded up to ffn_multiple_of.",
        None,
    )
    ffn_multiple_of: int = documented("Rounding for the derived ffn_hidden_size.", 256)
    norm_eps: float = documented("Epsilon of RMSNorm.", 1e-5)
    rope_theta: float = documented("Base of the rotary position embedding frequencies.", 10000.0)
    tie_embeddings: bool = documented("Share the input embedding matrix with the output layer.", False)
    init_std: float = documented(
        "Std of the normal init; output projections use init_std / sqrt(2 x num_layers) (GPT-2 scaled init).",
        0.02,
    )
    vocab_pad_multiple: int = documented(
        "Embedding and output rows are padded to a multiple of this x parallel.tp (aligned matmuls, even "
        "tensor-parallel shards); padded rows stay zero, are never predicted, and are removed on export.",
        128,
    )
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_size(self) -> int:
        """The width of one attention head: model.head_dim, or hidden_size / num_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        raw = int(8 * self.hidden_size / 3)
        return self.ffn_multiple_of * math.ceil(raw / self.ffn_multiple_of)

    @property
    def expert_ffn_size(self) -> int:
        """Inner width of one routed (or shared) expert."""
        width = self.moe.expert_ffn_hidden_size
        return width if width is not None else self.ffn_size

    def is_moe_block(self, block: int) -> bool:
        """Whether decoder block `block` (0-based) has a mixture of experts instead of a dense MLP."""
        return self.moe.enabled and block >= self.moe.first_dense_layers

    @property
    def num_moe_blocks(self) -> int:
        return sum(self.is_moe_block(b) for b in range(self.num_layers))

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        multiple = self.vocab_pad_multiple * tensor_parallel
        return multiple * math.ceil(self.vocab_size / multiple)

    def problems(self) -> list[str]:
        """Impossible sizes and head counts, each with its fix. (vocab_pad_multiple is checked with the
        parallel degrees, `ParallelConfig.problems`: the padding unit is vocab_pad_multiple x tp.)"""
        p: list[str] = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_multiple_of"):
            p += positive(f"model.{name}", getattr(self, name))
        if self.num_kv_heads is not None:
            p += positive("model.num_kv_heads", self.num_kv_heads)
        if self.ffn_hidden_size is not None:
            p += positive("model.ffn_hidden_size", self.ffn_hidden_size)
        p += positive("model.norm_eps", self.norm_eps)
        p += positive("model.rope_theta", self.rope_theta)
        p += positive("model.init_std", self.init_std)
        if self.head_dim is not None:
            p += positive("model.head_dim", self.head_dim)
            if self.head_dim > 0 and self.head_dim % 2:
                p.append(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
        elif self.num_heads > 0 and self.hidden_size % self.num_heads:
            p.append(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}); "
                f"head_dim would not be an integer: set model.head_dim, or change the head count"
            )
        elif self.num_heads > 0 and self.head_size % 2:
            p.append(
                f"head_dim = hidden_size / num_heads = {self.head_size} must be even for rotary embeddings: "
                f"set model.head_dim to an even width"
            )
        if self.num_kv_heads and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            p.append(
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads ({self.num_kv_heads}) "
                f"for grouped-query attention"
            )
        return p + self.moe.problems(self.num_layers)
