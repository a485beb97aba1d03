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
    attention          rotated q and k, v, the output, the log-sum-exp: p N (2q + 2k) / t + 4 N heads / t;
                       with model.qk_norm the per-head norms of q and k keep the fp32 copy of their input
                       and the normalized values, (4 + p) N (q + k) / t, and 1 / rms per head and
                       position, 4 N (heads + kv_heads) / t
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

mixture-of-experts block (pretrain/model/moe.py; E routed experts of width g, k per token, shared
experts of summed width s, expert-parallel degree ep): attention and norms as above; in place of the
SwiGLU (no sequence parallelism with MoE; the router and the routed experts see all N tokens on every
tensor-parallel rank, the shared experts are split like the dense MLP):
    router            fp32 logits and scores, 8 N E (the z-loss's logsumexp keeps the logits, softmax
                      or sigmoid its output); the chosen experts, 8 N k (int64); the top-k scores (4 N k,
                      kept by their normalisation) and the weights the combine multiplies by (4 N k, or
                      p N k once cast to a 16-bit dtype); the normalising sum and the logsumexp, 8 N;
                      training in 16 bits also the fp32 copy of the input, 4 N d, and of the weight, 4 E d
    dispatch          the permuted tokens, one (token, slot) pair per row, N k rows of d: gathered in,
                      expert outputs concatenated, and scattered back to (token, slot) order for the
                      weighted sum: 3 p N k d with ep = 1 (the gathered rows are the experts' input);
                      with ep > 1 the all-to-all's own input is not kept but what arrives, what the
                      experts return and what comes back are: 4 p N k d (dropless and balanced: a rank
                      receives on average as many rows as it sends, N k); the int64 row indices of the
                      gather and the scatter, 16 N k (24 N k with ep > 1: also the regrouping by
                      local expert)
    routed experts    the SwiGLU of the rows a rank computes: 4 p N k g (on average, as above)
    shared experts    4 p N s / t, the SwiGLU above (without them, in 16 bits, nothing keeps the norm's
                      output: p N d less)
selective recomputation keeps the matmul outputs: logits 4 N E, routed gate and up 2 p N k g and down
p N k d, shared gate and up 2 p N s / t and down p N d (and o_proj's, as for the dense block).
Load imbalance is not modelled: the busiest rank of a skewed routing receives more than N k rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class ExpertShape:
    """The mixture-of-experts MLP's sizes (pretrain.config's model.moe, parallel.ep)."""

    experts: int  # E
    top_k: int  # k
    width: int  # g, one routed expert's SwiGLU width
    shared: int  # s, the shared experts' summed width
    ep: int
    normalize: bool  # normalize_top_k: the top-k scores are kept for their normalisation
    sigmoid: bool  # sigmoid scores: their normalised copy for the balancing loss keeps its sum

    @classmethod
    def of(cls, cfg: Config) -> ExpertShape | None:
        m = cfg.model
        if not m.moe.enabled:
            return None
        width = m.expert_ffn_size
        return cls(
            experts=m.moe.num_experts,
            top_k=m.moe.top_k,
            width=width,
            shared=m.moe.num_shared_experts * width,
            ep=cfg.parallel.ep,
            normalize=m.moe.normalize_top_k,
            sigmoid=m.moe.score_func == "sigmoid",
        )


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
    moe: ExpertShape | None = None  # the MoE blocks' MLP, when the model has any
    qk_norm_heads: int = 0  # heads + kv_heads with model.qk_norm (their per-head norms), else 0

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
            moe=ExpertShape.of(cfg),
            qk_norm_heads=m.num_heads + m.kv_heads if m.qk_norm else 0,
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


def block_bytes(s: ActivationShape, mode: str, moe: bool = False) -> float:
    """Saved activations of one decoder block between its forward and its backward (`moe`: a block
    whose MLP is the mixture of experts)."""
    p, n, d, t = s.dtype_bytes, s.tokens, s.hidden, s.tp
    if mode == "full":
        return p * s.residual_tokens * d
    if mode == "selective":
        kept = p * s.residual_tokens * d  # the checkpoint's input
        kept += p * n * (s.q_width + 2 * s.kv_width) / t + p * n * d  # q, k, v and o_proj's output
        kept += _attention_output(s) if s.attention_output_saved else 0.0
        return kept + (_moe_selective(s) if moe else p * n * d + 2 * p * n * s.ffn / t)
    assert mode == "none", mode
    attention = p * n * (s.q_width + 2 * s.kv_width) / t + _attention_output(s)
    if s.qk_norm_heads:
        attention += ((4 + p) * n * (s.q_width + s.kv_width) + 4 * n * s.qk_norm_heads) / t
    mlp = _moe_mlp(s) if moe else 4 * p * n * s.ffn / t
    return _norm(s, 3) + _norm(s, 2) + attention + mlp


def _experts(s: ActivationShape) -> ExpertShape:
    assert s.moe is not None, "an MoE block in a model without model.moe"
    return s.moe


def _moe_selective(s: ActivationShape) -> float:
    """What selective recomputation keeps of an MoE MLP: its matmul outputs."""
    e, p, n, d = _experts(s), s.dtype_bytes, s.tokens, s.hidden
    routed = 2 * p * n * e.top_k * e.width + p * n * e.top_k * d
    shared = 2 * p * n * e.shared / s.tp + (p * n * d if e.shared else 0.0)
    return 4 * n * e.experts + routed + shared


def router_bytes(s: ActivationShape) -> float:
    """The router's saved tensors (see the module docstring), every term but one number per sequence."""
    e, p, n, d = _experts(s), s.dtype_bytes, s.tokens, s.hidden
    total = 8 * n * e.experts + 8 * n * e.top_k + 4 * n  # logits and scores, chosen, logsumexp
    if e.normalize:
        total += 4 * n * e.top_k + 4 * n  # the top-k scores and their sum
    if e.sigmoid:
        total += 4 * n  # the scores' sum, for the balancing loss's probabilities
    total += (4 if p == 4 else p) * n * e.top_k  # the combine's weights
    if p != 4:
        total += 4 * n * d + 4 * e.experts * d  # fp32 copies of the input and the router's weight
    return total


def dispatch_bytes(s: ActivationShape) -> float:
    """The permuted (token, slot) rows an MoE block keeps, and their indices."""
    e, p, n = _experts(s), s.dtype_bytes, s.tokens
    rows = n * e.top_k
    copies, indices = (4, 24) if e.ep > 1 else (3, 16)
    return copies * p * rows * s.hidden + indices * rows


def _moe_mlp(s: ActivationShape) -> float:
    e, p, n = _experts(s), s.dtype_bytes, s.tokens
    routed = 4 * p * n * e.top_k * e.width
    # Without shared experts nothing keeps the norm's 16-bit output (the router keeps its fp32 copy).
    unkept = p * n * s.hidden if not e.shared and p != 4 else 0.0
    return router_bytes(s) + dispatch_bytes(s) + routed + 4 * p * n * e.shared / s.tp - unkept


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


def block_working_bytes(s: ActivationShape, moe: bool = False) -> float:
    """Short-lived in a block's backward: the gradient of the residual stream, of gate and of up; in
    an MoE block of the rows returned and dispatched (with ep > 1 the backward all-to-all's send and
    receive buffers, 2 p N k d) and of the routed experts' gate and up, or of the shared ones'."""
    p, n = s.dtype_bytes, s.tokens
    if not moe:
        return p * n * (s.hidden + 2 * s.ffn / s.tp)
    e = _experts(s)
    return p * n * (s.hidden + max(2 * e.top_k * (s.hidden + e.width), 2 * e.shared / s.tp))


def boundary_bytes(s: ActivationShape) -> float:
    """One activation sent between pipeline stages (split over the tensor-parallel ranks, by DeepSpeed's
    pipe_partitioned or by sequence parallelism, when tp > 1)."""
    return s.dtype_bytes * s.tokens * s.hidden / s.tp
