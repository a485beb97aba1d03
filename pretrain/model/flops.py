"""Exact parameter count and model FLOPs per token, from the shape alone (no memory needed).

Parameters (unique tensors, tied embeddings counted once):
    embedding        V d
    per block        d (h + 2 k) e  [q, k, v]  +  h e d  [o]  +  3 d f  [SwiGLU]  +  2 d  [two RMSNorms]
    final norm       d
    output head      V d            (0 when tied to the embedding)
with V vocab, d hidden size, h heads, k kv-heads, e head dim, f SwiGLU width, L blocks.

Model FLOPs per trained token (forward + backward = 3 x forward; no recomputation counted,
so this gives MFU, not HFU), following PaLM (Chowdhery et al. 2022, appendix B) and
Megatron-LM (Narayanan et al. 2021, eq. 3):
    forward = 2 x (matmul weights, including the output head even when tied)
            + 2 x 2 x L x T x h x e   (scores QK^T and the weighted sum AV over sequence length T)
    train   = 3 x forward
Attention is counted over the full T x T score matrix, as both papers do, although a causal
kernel computes about half of it; the embedding lookup, norms, softmax and activations are
not matmuls and are left out.
"""

from __future__ import annotations

from pretrain.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> int:
    d, e, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    per_block = d * (cfg.num_heads + 2 * cfg.kv_heads) * e + cfg.num_heads * e * d + 3 * d * f + 2 * d
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return embedding + cfg.num_layers * per_block + d + head


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product for every token (the output head always does)."""
    d, e, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    per_block = d * (cfg.num_heads + 2 * cfg.kv_heads) * e + cfg.num_heads * e * d + 3 * d * f
    return cfg.num_layers * per_block + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward) at sequence length `seq_len`."""
    attention = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 3 * (2 * matmul_parameters(cfg) + attention)
