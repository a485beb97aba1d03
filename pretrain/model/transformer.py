"""The decoder as an ordered list of layers: embedding, blocks..., final norm, output head.

The same list feeds a plain single-process run (`Transformer.forward`) and, in the pipeline issue,
DeepSpeed's `PipelineModule`. Nothing here knows about process groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model.layers import DecoderBlock, RMSNorm, Rotary, init_weights

IGNORE_INDEX = -100


class TokenEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)


class OutputHead(nn.Module):
    """Final RMSNorm and the projection to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class Transformer(nn.Module):
    """Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.embedding = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.head = OutputHead(cfg)
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embedding.embed_tokens.weight

    def layers(self) -> list[nn.Module]:
        return [self.embedding, *self.blocks, self.head]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab); with `labels`, the mean next-token cross-entropy instead."""
        x = tokens
        for layer in self.layers():
            x = layer(x)
        return x if labels is None else causal_lm_loss(x, labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not IGNORE_INDEX; computed in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
