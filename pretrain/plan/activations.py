"""Bytes that autograd keeps for the backward pass, per micro-batch, for this code base's layers.

Derived from what each op of `pretrain/model/layers.py` and `pretrain/parallel/tensor_parallel.py`
saves (PyTorch saves an op's inputs only when the backward needs them), with N tokens in the
micro-batch, d the hidden size, q = heads x head_dim, k = kv_heads x head_dim, f the SwiGLU width,
t the tensor-parallel degree and p the bytes of the training dtype (2 for bf16, 4 for fp32):

decoder block, no recomputation
    each RMSNorm       fp32 copy of its input (4) and normalized (p): (4 + p) N d (with fp32 training
                       the "copy" is the input itself); its output weight x normalized (p N d) is what
                       the column-parallel linears after it save.
                       With sequence parallelism the norm sees N / t positions, and each column-parallel
                       linear saves its own all-gathered input instead: 3 p N d (q, k, v) + 2 p N d
                       (gate, up)
    attention          rotated q and k, v, the output, the log-sum-exp: p N (2q + 2k) / t + 4 N heads / t
                       (o_proj's input is the output itself: the flash kernels return it laid out
                       (batch, seq, heads, dim), so reshaping the heads back is a view)
    SwiGLU             gate, silu(gate), up, their product: 4 p N f / t
    (rotary, residual adds and the tensor-parallel collectives save nothing)

selective recomputation (torch.utils.checkpoint with the policy of layers.py: outputs of matmuls and
of the fused attention ops it lists are cached, everything else is recomputed)
    block input p N d (/ t with sequence parallelism), q, k, v p N (q + 2k) / t, o_proj and down_proj
    outputs 2 p N d (full width: cached before the all-reduce), gate and up 2 p N f / t, and the
    attention output and log-sum-exp only where the device's attention op is in that list (the CUDA
    flash/efficient kernels are; the CPU flash kernel is not)

full recomputation   the block input only, p N d (/ t with sequence parallelism)

With recomputation the backward pass of one block holds its recomputed activations again, which is
added once (not per block) as working memory.

Outside the blocks: the embedding saves its token indices (8 N); the final norm as above (its output
all-gathered for the head with sequence parallelism); the loss keeps log-softmax in fp32, 4 N V
(vocabulary-parallel: the softmax of its 1/t of the padded vocabulary, 4 N V_pad / t).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class ActivationShape:
    """Everything the activation sizes depend on, for one rank and one micro-batch."""

    tokens: int  # N = micro-batch x seq_len
    hidden: int  # d
    q_width: int  # heads x head_dim
    kv_width: int  # kv_heads x head_dim
    ffn: int  # f
    heads: int
    vocab: int  # the real vocabulary
    padded_vocab: int
    tp: int
    sequence_parallel: bool
    dtype_bytes: int  # p
    attention_output_saved: bool  # whether selective recomputation caches the attention output

    @classmethod
    def of(cls, cfg: Config, dtype_bytes: int, attention_output_saved: bool) -> ActivationShape:
        m = cfg.model
        return cls(
            tokens=cfg.train.micro_batch_size * cfg.train.seq_len,
            hidden=m.hidden_size,
            q_width=m.num_heads * m.head_size,
            kv_width=m.kv_heads * m.head_size,
            ffn=m.ffn_size,
            heads=m.num_heads,
            vocab=m.vocab_size,
            padded_vocab=cfg.padded_vocab_size,
            tp=cfg.parallel.tp,
            sequence_parallel=cfg.parallel.sequence_parallel and cfg.parallel.tp > 1,
            dtype_bytes=dtype_bytes,
            attention_output_saved=attention_output_saved,
        )

    @property
    def residual_tokens(self) -> float:
        """Positions a rank holds outside the tensor-parallel regions (N / t with sequence parallelism)."""
        return self.tokens / self.tp if self.sequence_parallel else self.tokens


def _norm(s: ActivationShape, consumers: int) -> float:
    """A norm and the inputs saved by the `consumers` column-parallel linears that read its output."""
    p, d = s.dtype_bytes, s.hidden
    if s.sequence_parallel:
        return (4 + p) * s.residual_tokens * d + consumers * p * s.tokens * d
    return (4 + 2 * p) * s.tokens * d


def _attention_output(s: ActivationShape) -> float:
    return (s.dtype_bytes * s.tokens * s.q_width + 4 * s.tokens * s.heads) / s.tp


def block_bytes(s: ActivationShape, mode: str) -> float:
    """Saved activations of one decoder block between its forward and its backward."""
    p, n, d, t = s.dtype_bytes, s.tokens, s.hidden, s.tp
    if mode == "full":
        return p * s.residual_tokens * d
    if mode == "selective":
        kept = p * s.residual_tokens * d  # the checkpoint's input
        kept += p * n * (s.q_width + 2 * s.kv_width) / t + 2 * p * n * d + 2 * p * n * s.ffn / t
        return kept + (_attention_output(s) if s.attention_output_saved else 0.0)
    assert mode == "none", mode
    attention = p * n * (s.q_width + 2 * s.kv_width) / t + _attention_output(s)
    return _norm(s, 3) + _norm(s, 2) + attention + 4 * p * n * s.ffn / t


def embedding_bytes(s: ActivationShape) -> float:
    return 8.0 * s.tokens  # int64 token indices (vocabulary-parallel: plus a boolean mask, ignored)


def final_norm_bytes(s: ActivationShape) -> float:
    return _norm(s, 1)


def loss_bytes(s: ActivationShape) -> float:
    """The fp32 (log-)softmax the cross-entropy keeps."""
    if s.tp == 1:
        return 4.0 * s.tokens * s.vocab
    return 4.0 * s.tokens * s.padded_vocab / s.tp


def loss_working_bytes(s: ActivationShape) -> float:
    """Short-lived in the loss's backward: the fp32 gradient of the softmax and the logits' gradient."""
    local_vocab = s.vocab if s.tp == 1 else s.padded_vocab / s.tp
    return 4.0 * s.tokens * local_vocab + s.dtype_bytes * s.tokens * s.padded_vocab / s.tp


def block_working_bytes(s: ActivationShape) -> float:
    """Short-lived in a block's backward: the gradient of the residual stream, of gate and of up."""
    return s.dtype_bytes * s.tokens * (s.hidden + 2 * s.ffn / s.tp)


def boundary_bytes(s: ActivationShape) -> float:
    """One activation sent between pipeline stages (split over the tensor-parallel ranks, by DeepSpeed's
    pipe_partitioned or by sequence parallelism, when tp > 1)."""
    return s.dtype_bytes * s.tokens * s.hidden / s.tp
