"""Exact parameter count and model FLOPs per token, from the shape alone (no memory needed).

Parameters (unique tensors, tied embeddings counted once):
    embedding        V d
    per block        d (h + 2 k) e  [q, k, v]  +  h e d  [o]  +  3 d f  [SwiGLU]  +  2 d  [two RMSNorms]
    final norm       d
    output head      V d            (0 when tied to the embedding)
with V vocab, d hidden size, h heads, k kv-heads, e head dim, f SwiGLU width, L blocks.

Mixture of experts (model.moe, E routed experts of width g, k active, s shared, from block
first_dense_layers on): an MoE block's MLP is
    router           E d
    routed experts   E x 3 d g        (active per token: k x 3 d g)
    shared experts   3 d (s g)        (always active)
in place of the dense 3 d f. Active parameters per token count k routed experts, the shared ones
and the router, and FLOPs count only those (as DeepSeek-V3's "37B activated" and Megatron-Core's
MoE FLOPs: Narayanan et al.'s formula with the MLP term replaced by the active experts').

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


def _attention_parameters(cfg: ModelConfig) -> int:
    d, e = cfg.hidden_size, cfg.head_size
    return d * (cfg.num_heads + 2 * cfg.kv_heads) * e + cfg.num_heads * e * d


def _mlp_parameters(cfg: ModelConfig, active: bool) -> int:
    """All blocks' MLP parameters: dense blocks 3 d f; MoE blocks the router, the routed experts
    (`active`: only k of them) and the shared experts."""
    d, moe = cfg.hidden_size, cfg.moe
    moe_blocks = cfg.num_moe_blocks
    dense = (cfg.num_layers - moe_blocks) * 3 * d * cfg.ffn_size
    if not moe_blocks:
        return dense
    routed = moe.top_k if active else moe.num_experts
    per_moe = moe.num_experts * d + (routed + moe.num_shared_experts) * 3 * d * cfg.expert_ffn_size
    return dense + moe_blocks * per_moe


def count_parameters(cfg: ModelConfig) -> int:
    d = cfg.hidden_size
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    norms = 2 * d + (2 * cfg.head_size if cfg.qk_norm else 0)
    blocks = cfg.num_layers * (_attention_parameters(cfg) + norms) + _mlp_parameters(cfg, active=False)
    return embedding + blocks + d + head


def active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token uses: all of a dense model; of an MoE, k routed experts per block."""
    return count_parameters(cfg) - _mlp_parameters(cfg, active=False) + _mlp_parameters(cfg, active=True)


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product for every token (the output head always does; of
    an MoE block the router, k routed and the shared experts)."""
    blocks = cfg.num_layers * _attention_parameters(cfg) + _mlp_parameters(cfg, active=True)
    return blocks + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward) at sequence length `seq_len`."""
    attention = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
    return 3 * (2 * matmul_parameters(cfg) + attention)
