"""pretrain.plan for mixtures of experts with expert parallelism, against hand calculations, autograd's
saved tensors, a real two-rank DeepSpeed engine and the trainer's own construction.

configs/tiny-moe.yaml: hidden 128, 4 blocks (block 0 dense, blocks 1-3 MoE), 8 routed experts of
width 96 (top-2) and 1 shared expert, vocabulary 320 padded to 384. One routed expert is 3 x 128 x 96 =
36,864 parameters, one MoE block's routed experts 8 x 36,864 = 294,912, the model's 3 x 294,912 =
884,736; the rest of a rank (padded, one stage, tp 1) is 1,429,632 - 884,736 = 544,896.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import Config, load_config
from pretrain.plan import construct as construct_module
from pretrain.plan import make_cluster, plan_layout, search_layouts
from pretrain.plan.activations import ActivationShape, block_bytes
from pretrain.plan.construct import prove_construction
from pretrain.plan.counts import layer_counts, parameter_count, rank_expert_parameters, rank_parameters
from pretrain.plan.memory import CPU, estimate_memory
from pretrain.plan.performance import _block_matmul_flops, block_flops
from pretrain.plan.planner import layout_problems

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = REPO / "configs" / "tiny-moe.yaml"
ROUTED_PER_BLOCK = 8 * 3 * 128 * 96  # 294,912
ROUTED = 3 * ROUTED_PER_BLOCK  # 884,736
DENSE = 1_429_632 - ROUTED  # 544,896: everything else a rank of one stage holds


def tiny_moe(world: int, *overrides: str) -> Config:
    return load_config(TINY_MOE, list(overrides), world_size=world)


@pytest.mark.parametrize("ep", [1, 2, 8])
def test_a_rank_holds_one_ep_th_of_the_routed_experts(ep):
    cfg = tiny_moe(8, f"parallel.ep={ep}", "train.micro_batch_size=2")
    assert [c.experts for c in layer_counts(cfg)] == [0, 0, *[ROUTED_PER_BLOCK] * 3, 0, 0]
    assert rank_expert_parameters(cfg) == [ROUTED // ep]
    assert rank_parameters(cfg) == [DENSE + ROUTED // ep]
    assert parameter_count(cfg) == 1_413_248  # unchanged by the layout (the trainer's printed count)


@pytest.mark.parametrize(("ep", "zero"), [(1, 1), (2, 1), (8, 1), (1, 2), (2, 2), (8, 2)])
def test_expert_states_are_partitioned_over_the_expert_data_parallel_ranks(ep, zero):
    """bf16 (bf16 accumulation) on 8 ranks. Masters and Adam (12 bytes) over dp = 8 for the dense part
    and over dp/ep for the rank's E/ep experts: 12 (D/8 + (R/ep)/(8/ep)) = 12 (D + R)/8 at every ep
    (each rank keeps 1/8 of every expert's state either way); the bf16 weights (2 bytes) hold the rank's
    experts only; ZeRO-2's gradient partition is split like the optimizer state, ZeRO-1's is whole."""
    cfg = tiny_moe(8, f"parallel.ep={ep}", f"parallel.zero_stage={zero}", "train.micro_batch_size=2",
                   "train.precision=bf16", "train.grad_accum_dtype=bf16")  # fmt: skip
    stage = estimate_memory(cfg, 8, capacity=2**40).stages[0]
    local = ROUTED // ep
    assert stage.expert_parameters == local
    assert stage.weights == 2 * (DENSE + local)
    assert (
        stage.optimizer_states == int(12 * (DENSE / 8 + local / (8 // ep))) == int(12 * (DENSE + ROUTED) / 8)
    )
    gradients = 2 * (DENSE + local) if zero == 1 else 2 * (DENSE / 8 + local / (8 // ep))
    assert stage.gradients == int(gradients)
    # ZeRO-1's step: the gradient partition copied in and flattened, its fp32 copy, foreach's temporary
    # off CUDA (here CUDA: fused) -> (2 + 2 + 4) bytes per element of the partition D/8 + local/(8/ep).
    if zero == 1:
        assert stage.step_extra == int(8 * (DENSE / 8 + local / (8 // ep)))


def test_all_to_all_bytes_and_time_by_hand():
    """tiny-moe, bf16, micro-batch 2 x 256 tokens, ep 8 on 8 ranks: each exchange moves a rank's
    N k rows of d: 2 bytes x 512 x 2 x 128 = 262,144 bytes, 7/8 of them to other ranks. Per MoE block
    and micro-batch: dispatch + combine forward and backward (4), one count exchange (latency only);
    with recomputation 2 + 1 more. One micro-batch per step (16 = 2 x 8)."""
    nbytes = 2 * 512 * 2 * 128
    for nodes, per_node, mode, bandwidth, latency, exchanges, counts in [
        (1, 8, "none", 450e9 * 0.8, 10e-6, 4, 1),  # in one node: NVLink
        (2, 4, "none", 50e9 * 0.8, 30e-6, 4, 1),  # the group spans two nodes: the network
        (1, 8, "full", 450e9 * 0.8, 10e-6, 6, 2),
    ]:
        cfg = tiny_moe(8, "parallel.ep=8", "train.micro_batch_size=2", "train.precision=bf16",
                       f"parallel.activation_checkpointing={mode}")  # fmt: skip
        step = plan_layout(cfg, make_cluster(nodes, per_node, "h100-80gb")).step
        one = latency + 7 / 8 * nbytes / bandwidth
        assert step.all_to_all_bytes_per_block == nbytes
        assert step.all_to_all_s == pytest.approx(3 * (exchanges * one + counts * latency), rel=1e-12)
        assert step.micro_batch_s >= step.all_to_all_s  # on the critical path
    no_ep = plan_layout(tiny_moe(8, "train.micro_batch_size=2"), make_cluster(1, 8, "h100-80gb")).step
    assert no_ep.all_to_all_s == 0.0


def test_expert_gradients_and_weights_go_over_the_expert_data_parallel_ranks():
    """bf16 ZeRO-1 under a pipeline (no overlap): per step one reduce-scatter of the gradients and one
    all-gather of the weights, 2 bytes each. 8 ranks = pp 2 x dp 4, ep 2: the dense part over 4 ranks,
    the experts over dp/ep = 2, one collective each, within 4 consecutive ranks (NVLink, 10 us).
    The larger stage (blocks 2-3, norm, head) holds 518,784 parameters, 2 x 294,912 / 2 of them experts."""
    cfg = tiny_moe(
        8, "parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=2", "train.grad_accum_dtype=bf16"
    )
    experts, params = ROUTED_PER_BLOCK, 518_784
    assert (rank_parameters(cfg)[1], rank_expert_parameters(cfg)[1]) == (params, experts)
    bandwidth, latency = 450e9 * 0.8, 10e-6
    one_pass = 2 * latency + (3 / 4 * 2 * (params - experts) + 1 / 2 * 2 * experts) / bandwidth
    step = plan_layout(cfg, make_cluster(1, 8, "h100-80gb")).step
    assert step.data_parallel_s == pytest.approx(2 * one_pass, rel=1e-12)


def test_routed_expert_flops_are_not_split_over_tensor_parallel_ranks():
    """Every TP rank runs the routed experts of its (identical) tokens: their 3 x 2 x k x 3 d g =
    18 x 2 x 128 x 96 FLOPs per token and block stay whole, the rest of the block is split."""
    cfg = tiny_moe(2, "parallel.tp=2")
    routed = 18 * 2 * 128 * 96
    dense, moe_block = block_flops(cfg)[0], block_flops(cfg, moe_block=True)[0]
    assert _block_matmul_flops(cfg, 1, 3) == pytest.approx(
        dense / 2 + 3 * ((moe_block - routed) / 2 + routed)
    )
    # An MoE block's active MLP: router 8 x 128, k + shared = 3 experts of 3 x 128 x 96 (x 6 FLOPs).
    assert moe_block - dense == pytest.approx(6 * (8 * 128 + 3 * 3 * 128 * 96 - 3 * 128 * 352))


@pytest.mark.parametrize(
    ("dtype", "overrides"),
    [
        (torch.float32, []),
        (torch.bfloat16, []),
        (torch.float32, ["model.moe.score_func=sigmoid", "model.moe.normalize_top_k=false"]),
        (
            torch.bfloat16,
            ["model.moe.score_func=sigmoid", "model.moe.num_shared_experts=0", "model.moe.top_k=3"],
        ),
    ],
)
def test_moe_block_activation_bytes_equal_what_autograd_saves(dtype, overrides):
    """The 'none' formula against the bytes autograd keeps for a real MoE decoder block (ep 1) on this
    CPU: every saved tensor's storage once, weights and rotary tables left out."""
    from plan_memory_probe import block_saved_bytes
    from pretrain.model.layers import DecoderBlock, rotary_tables

    cfg = tiny_moe(1, *overrides, "train.micro_batch_size=2", "train.seq_len=64")
    m = cfg.model
    torch.manual_seed(0)
    block = DecoderBlock(m, True)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block = block.to(dtype)
    x = torch.randn(2, 64, m.hidden_size, dtype=dtype, requires_grad=True)
    saved = block_saved_bytes(block, x, rotary_tables(m.head_size, 64, m.rope_theta, x.device))
    shape = ActivationShape.of(cfg, dtype_bytes=x.element_size(), attention_output_saved=False)
    # Left out: each norm's 1 / rms (fp32, one per position) and the per-sequence mean probabilities.
    small = 2 * 4 * 128 + 4 * 2 * m.moe.num_experts
    assert saved - small == block_bytes(shape, "none", moe=True)


def test_search_enumerates_expert_parallelism_and_keeps_only_valid_layouts():
    cfg = load_config(TINY_MOE, [], world_size=None)
    result = search_layouts(cfg, make_cluster(1, 8, "h100-80gb"))
    assert result.ranked
    seen = set()
    for plan in result.ranked:
        par, dp = plan.cfg.parallel, plan.layout()["dp"]
        seen.add(par.ep)
        assert dp % par.ep == 0 and 8 % par.ep == 0
        assert par.zero_stage in (1, 2) or (par.zero_stage == 0 and par.ep == 1)  # ZeRO-3: no MoE
        assert not par.sequence_parallel or par.tp == 1
        assert not layout_problems(plan.cfg, 8)
        assert f"parallel.ep={par.ep}" in plan.overrides()
    assert seen == {1, 2, 4, 8}
    # A dense model's search is unchanged: only ep 1.
    dense = search_layouts(
        load_config(REPO / "configs" / "tiny.yaml", [], world_size=None), make_cluster(1, 2, "h100-80gb")
    )
    assert {p.cfg.parallel.ep for p in dense.ranked} == {1}


def test_cli_reports_ep_and_the_all_to_all(capsys, monkeypatch):
    from pretrain.plan.__main__ import main

    monkeypatch.chdir(REPO)
    args = ["--config", "configs/tiny-moe.yaml", "--nodes", "1", "--gpus-per-node", "4", "parallel.ep=4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "expert-parallel 4" in text and "all-to-all" in text and "experts 1)" in text
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"]["ep"] == 4 and out["layout"]["expert_data_parallel"] == 1
    assert out["performance"]["all_to_all_s"] > 0
    assert out["memory"]["stages"][0]["expert_parameters"] == ROUTED // 4


def test_prove_construction_of_an_moe_layout_with_ep_tp_and_pp():
    cfg = tiny_moe(8, "parallel.ep=2", "parallel.tp=2", "parallel.pp=2")
    proof = prove_construction(cfg)
    assert proof.ok, proof.problems
    assert (proof.ranks, proof.expert_ranks) == (4, 2)
    # Stage 0 holds block 1 (MoE), stage 1 blocks 2-3: each rank 4 / 2 = 4 of the 8 experts of each.
    assert rank_expert_parameters(cfg) == [ROUTED_PER_BLOCK // 2, 2 * ROUTED_PER_BLOCK // 2]


KIMI_K2_SHAPE = [
    "model.vocab_size=163840",
    "model.hidden_size=7168",
    "model.num_layers=61",
    "model.num_heads=64",
    "model.num_kv_heads=64",
    "model.head_dim=128",
    "model.ffn_hidden_size=18432",
    "model.moe.num_experts=384",
    "model.moe.top_k=8",
    "model.moe.expert_ffn_hidden_size=2048",
    "model.moe.num_shared_experts=1",
    "model.moe.first_dense_layers=1",
    "model.moe.score_func=sigmoid",
    "train.seq_len=4096",
    "train.micro_batch_size=1",
    "train.global_batch_size=64",
]


def test_prove_construction_of_the_kimi_k2_shape():
    """61 blocks (the first dense), 384 routed experts of width 2048 and 1 shared, hidden 7168: 1.04T
    parameters, built as 16 stages x 8 tensor-parallel ranks and the expert slices of 4 EP ranks."""
    cfg = tiny_moe(512, *KIMI_K2_SHAPE, "parallel.tp=8", "parallel.pp=16", "parallel.ep=4")
    proof = prove_construction(cfg)
    assert proof.ok, proof.problems
    assert (proof.ranks, proof.expert_ranks) == (16 * 8, 4)
    routed = 60 * 384 * 3 * 7168 * 2048
    assert sum(rank_expert_parameters(cfg)) == routed // 4
    assert parameter_count(cfg) > 10**12


def test_prove_construction_fails_when_ep_ranks_take_the_wrong_experts(monkeypatch):
    """Every EP rank taking rank 0's experts: the slices still have the right shapes, but the
    numbered stand-in shows experts 0..3 twice and 4..7 never."""
    real = construct_module.ExpertParallelExperts
    monkeypatch.setattr(
        construct_module, "ExpertParallelExperts", lambda full, ep, rank, group: real(full, ep, 0, group)
    )
    problems = prove_construction(tiny_moe(2, "parallel.ep=2")).problems
    assert len(problems) == 1 and "hold experts [0, 1, 2, 3, 0, 1, 2, 3]" in problems[0]


def test_prove_construction_fails_when_the_planner_miscounts_experts(monkeypatch):
    monkeypatch.setattr(construct_module, "rank_expert_parameters", lambda cfg: [1])
    problems = prove_construction(tiny_moe(2, "parallel.ep=2")).problems
    assert len(problems) == 2 and all("planner counts 1" in p for p in problems)  # EP ranks 0 and 1


@pytest.mark.slow
def test_two_rank_engine_partitions_experts_as_planned_and_its_peak_matches(monkeypatch):
    """A real two-rank DeepSpeed engine of tiny-moe at ep 2 (fp32, ZeRO-1, CPU): its ZeRO optimizer
    puts the rank's 4 experts per block (442,368 parameters) in an MoE group partitioned over dp/ep =
    1 rank and the rest over 2; each rank's peak over two steps is within 15% of the estimate; and one
    MoE block's saved bytes under the real all-to-all are the formula's with the rows the rank received
    (the formula assumes N k: balanced routing)."""
    from plan_memory_probe import expert_parallel_rank
    from pretrain.testing import run_distributed

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO), *sys.path]))
    overrides = ["config=configs/tiny-moe.yaml", "parallel.ep=2"]
    ranks = run_distributed(expert_parallel_rank, 2, overrides, 2, timeout=300)
    cfg = tiny_moe(2, "parallel.ep=2", "train.precision=fp32")
    plan = estimate_memory(cfg, 2, capacity=2**40, runtime=CPU).stages[0]
    shape = ActivationShape.of(cfg, dtype_bytes=4, attention_output_saved=False)
    tokens = 4 * 256
    for rank in ranks:
        assert rank["parameters"] == plan.parameters == DENSE + ROUTED // 2
        moe_groups = [g for g in rank["groups"] if g["moe"]]
        assert [(g["partition_count"], g["fp32_partition"]) for g in moe_groups] == [(1, ROUTED // 2)]
        dense = [g for g in rank["groups"] if not g["moe"]]
        assert {g["partition_count"] for g in dense} == {2}
        assert (
            sum(g["parameters"] for g in dense) == DENSE
            and sum(g["fp32_partition"] for g in dense) == DENSE // 2
        )
        # fp32 ZeRO-1: a master copy and two Adam moments of the partition, 12 bytes per element.
        assert plan.optimizer_states == 12 * (DENSE // 2 + ROUTED // 2)
        assert abs(plan.peak - rank["peak_growth_bytes"]) <= 0.15 * rank["peak_growth_bytes"]
        block = rank["block"]
        rows = block["rows_received"] - 2 * tokens  # received beyond the balanced N k
        expected = block_bytes(shape, "none", moe=True) + rows * (2 * 4 * 128 + 4 * 4 * 96 + 8)
        assert block["saved_bytes"] - (2 * 4 * tokens + 4 * 4 * 8) == expected
    assert sum(r["block"]["rows_received"] for r in ranks) == 2 * 2 * tokens  # every row went somewhere


def test_expert_data_parallel_size_is_refused_where_the_trainer_refuses():
    # ep must divide dp and the experts; ZeRO-0 with ep > 1 and ZeRO-3 with MoE are refused.
    assert layout_problems(tiny_moe(4, "train.micro_batch_size=2"), 4) == []
    bad = dataclasses.replace(tiny_moe(4, "train.micro_batch_size=2").parallel, ep=3)
    assert layout_problems(dataclasses.replace(tiny_moe(4, "train.micro_batch_size=2"), parallel=bad), 4)
    zero0 = dataclasses.replace(bad, ep=2, zero_stage=0)
    assert layout_problems(dataclasses.replace(tiny_moe(4, "train.micro_batch_size=2"), parallel=zero0), 4)
