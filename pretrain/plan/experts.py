"""Mixture of experts in the plan: the expert-parallel split of parameters and optimizer state, and
the all-to-all token exchange. Every term, and where it comes from:

Parameters (pretrain.plan.counts): a rank holds 1/ep of each of its MoE blocks' routed experts, whole
(not split by tensor parallelism: every TP rank holds the same E/ep experts); router, shared experts,
attention and norms as in a dense block.

Model states (pretrain.plan.memory). DeepSpeed 0.19's ZeRO 1-2 optimizer (runtime/zero/stage_1_and_2.py,
`_configure_moe_settings`) and its BF16_Optimizer (runtime/bf16_optimizer.py) give each parameter
group its own process group: the MoE group (`moe: True`, which pretrain.parallel puts the expert
parameters in) is flattened and partitioned over its expert-data-parallel group, the dp/ep ranks
holding the same experts (`real_dp_process_group[i]`, `partition_count[i]`), every other group over
all dp ranks. So the ZeRO paper's bytes per parameter apply to the two parts separately: to the dense
part with Nd = dp, to the routed experts with Nd = dp/ep; the partitioned terms (masters and Adam
moments; under ZeRO-2 the gradient partition; the gradient partition ZeRO-1 copies and flattens at the
step, its fp32 copy and the foreach temporary) use the partition of each group, while the weights,
ZeRO-1's gradients and the BF16_Optimizer's fp32 gradient accumulator (`fp32_groups_gradients_flat`,
one flat buffer per group the size of the whole group, not of its partition) hold all of the rank's
parameters, experts included. ZeRO-3 and ZeRO-0 with ep > 1 are refused by the trainer.

Activations and working memory (pretrain.plan.activations): the router, the permuted tokens (with
ep > 1 what the all-to-all delivers and returns), the routed experts' SwiGLU for the rows a rank
computes (on average the micro-batch's N k rows: each rank sends its N k (token, slot) rows out and,
balanced, receives as many), and in the backward pass the exchange's send and receive buffers.

Step time (pretrain.plan.performance):
  FLOPs          the trainer's count of active parameters (pretrain/model/flops.py: k routed experts,
                 the shared experts and the router per token). Routed experts are whole on every TP
                 rank and compute the same tokens there, so their FLOPs are not divided by tp.
  all-to-all     per MoE block and micro-batch: forward dispatch and combine, two exchanges of the
                 p N k d bytes of a rank's (token, slot) rows, of which (ep-1)/ep leave the rank; the
                 backward pass the same two in reverse; recomputation (selective or full: the
                 checkpointed block is run again, exchanges included) two more. Each forward also
                 exchanges the per-expert counts first (latency only). Over the EP group: ep
                 data-parallel ranks tp apart, on NVLink when they fit in a node, else at the network's
                 bandwidth (all of the traffic, a bound: the share that stays in a node is faster).
                 Synchronous, on the critical path, like the tensor-parallel collectives, and not
                 hidden behind host time either (the host reads the counts before it sends the tokens).
                 Imbalance is ignored: the busiest rank of a skewed routing receives more and the
                 others wait.
  data-parallel  gradients of the dense part reduced (and weights gathered) over dp ranks, of the
                 routed experts over the dp/ep expert-data-parallel ranks, one after the other.
"""

from __future__ import annotations

from pretrain.config import Config


def expert_data_parallel_size(cfg: Config, world_size: int) -> int:
    """Ranks holding the same experts: DeepSpeed's expert-data-parallel group, dp / ep."""
    return cfg.data_parallel_size(world_size) // cfg.parallel.ep


def block_kinds(cfg: Config, indices: list[int]) -> tuple[int, int]:
    """(dense blocks, MoE blocks) among the layer-list indices (layer i + 1 is decoder block i)."""
    blocks = [i - 1 for i in indices if 1 <= i <= cfg.model.num_layers]
    moe = sum(cfg.model.is_moe_block(b) for b in blocks)
    return len(blocks) - moe, moe


def partition(params: int, experts: int, dp: int, edp: int) -> float:
    """Elements of this rank's ZeRO partition: the dense part over dp ranks, the experts over edp."""
    return (params - experts) / dp + experts / edp


def dispatch_bytes(cfg: Config, dtype_bytes: int) -> float:
    """One exchange's bytes on a rank: its micro-batch's N k (token, slot) rows of d elements."""
    m, t = cfg.model, cfg.train
    return dtype_bytes * t.micro_batch_size * t.seq_len * m.moe.top_k * m.hidden_size


def exchanges_per_block(mode: str) -> tuple[int, int]:
    """(token all-to-alls, count all-to-alls) of one MoE block per micro-batch, forward, backward and
    the recomputed forward."""
    recompute = mode != "none"
    return 4 + 2 * recompute, 1 + recompute


def routed_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token of one MoE block's k routed experts: 3 x 2 x k x 3 d g."""
    m = cfg.model
    return 18.0 * m.moe.top_k * m.hidden_size * m.expert_ffn_size
