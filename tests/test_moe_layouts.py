"""Mixture of experts in every layout: the real trainer, DeepSpeed engines and gloo all-to-all on CPU
processes, against one process training the same MoE model on the same data and global batch."""

import json

import pytest

from pretrain.testing import run_distributed
from training_runs import step_records, train_and_read_metrics

pytestmark = pytest.mark.slow

# 4 routed experts (top-2) of width 32 and one shared expert; SMALL has 2 blocks, so block 0 stays
# dense and block 1 is the MoE one. All three balancing mechanisms on, so their gradients and the
# bias update are part of what is compared.
MOE = [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_ffn_hidden_size=32",
    "model.moe.num_shared_experts=1",
    "model.moe.first_dense_layers=1",
    "model.moe.z_loss_coeff=0.001",
    "model.moe.bias_update_rate=0.01",
]

# The dense layouts' tolerance (tests/test_parallel_layouts.py): fp32 on CPU, reductions reordered by
# data, tensor and expert parallelism (~1e-7 relative per step). Observed for every layout below:
# identical to 6 digits. A lost or doubled expert gradient, an expert counted twice (or not at all)
# in the norm, or tokens sent to the wrong rank move the loss or the norm by > 1e-3 at once.
RTOL = 2e-5

# Dense-then-MoE over two stages: 4 blocks, block 0 dense; stage 0 holds blocks 0 (dense) and 1,
# stage 1 blocks 2 and 3 (under EP every stage needs an MoE block: pretrain.parallel.layout).
FOUR_BLOCKS = ["model.num_layers=4"]

LAYOUTS = {
    # name: (processes, layout, model overrides shared with the single-process reference)
    "ep2": (2, ["parallel.ep=2"], []),
    "ep4": (4, ["parallel.ep=4"], []),
    "ep2-tp2": (4, ["parallel.ep=2", "parallel.tp=2"], []),
    "ep2-pp2": (4, ["parallel.ep=2", "parallel.pp=2"], FOUR_BLOCKS),
    "ep2-zero2": (2, ["parallel.ep=2", "parallel.zero_stage=2"], []),
}


# Every run saves its step-3 checkpoint, which the resume and resharding tests below continue.
SAVE_AT_3 = ["checkpoint.interval=3", "checkpoint.keep_last=0"]
REFERENCES = {"one": (1, [], []), "one-4": (1, [], FOUR_BLOCKS)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name) -> metrics records of that layout ('one', 'one-4': the single-process references of
    the 2- and 4-block models), cached; runs.checkpoint(name) -> its step-3 checkpoint."""
    cache, folders = {}, {}

    def get(name):
        if name not in cache:
            processes, layout, model = REFERENCES.get(name) or LAYOUTS[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            overrides = [*MOE, *SAVE_AT_3, *model, *layout]
            cache[name] = run_distributed(train_and_read_metrics, processes, overrides, str(run_dir))[0]
            folders[name] = run_dir / "checkpoints" / "step00000003"
        return cache[name]

    def checkpoint(name):
        get(name)
        return folders[name]

    get.checkpoint = checkpoint
    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_the_single_process_run(name, runs):
    reference = "one-4" if LAYOUTS[name][2] else "one"
    expected, records = step_records(runs(reference)), step_records(runs(name))
    assert [r["step"] for r in records] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(records, expected, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"grad norm at {ref['step']}"
    assert records[-1]["loss"] < records[0]["loss"] - 0.5


def test_gradient_norm_counts_every_expert_once_at_ep_1_2_and_4(runs):
    """R8.1: the same run at EP 1, 2 and 4 logs the same global gradient norm at every step."""
    norms = {name: [r["grad_norm"] for r in step_records(runs(name))] for name in ("one", "ep2", "ep4")}
    for name in ("ep2", "ep4"):
        assert norms[name] == pytest.approx(norms["one"], rel=RTOL), name


def test_moe_metrics_reach_the_jsonl_with_the_load_of_every_block(runs):
    moe = [r for r in runs("ep2") if "moe_aux_loss" in r]
    reference = [r for r in runs("one") if "moe_aux_loss" in r]
    assert [r["step"] for r in moe] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(moe, reference, strict=True):
        # The balance is measured over all ranks' tokens: the same totals as one process.
        assert ours["moe_aux_loss"] == pytest.approx(ref["moe_aux_loss"], rel=RTOL)
        assert ours["moe_z_loss"] == pytest.approx(ref["moe_z_loss"], rel=RTOL)
        assert ours["moe_layers"] == ref["moe_layers"]
        assert set(ours["moe_layers"]) == {"blocks.1"}
        layer = ours["moe_layers"]["blocks.1"]
        assert layer["max_over_mean"] >= 1.0 >= layer["min_over_mean"] >= 0.0
        assert 0 <= layer["most_loaded"] < 4 and layer["dropped"] == 0
        assert 0.9 < ours["moe_aux_loss"] < 2.0  # 1 when perfectly balanced; E / k = 2 at worst


def layout_of(name):
    """(processes, all overrides but the checkpoint's) of a layout or reference run."""
    processes, layout, model = REFERENCES.get(name) or LAYOUTS[name]
    return processes, [*MOE, *SAVE_AT_3, *model, *layout]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ep_resume_is_bitwise_the_uninterrupted_run_router_bias_included(name, runs, tmp_path):
    """Exact resume with expert parallelism: each rank's experts (fp32 masters and Adam moments in
    its ZeRO partition file, module weights in its own part) and the routers' bias (moved every step
    by bias_update_rate) come back."""
    processes, overrides = layout_of(name)
    resume = [*overrides, f"checkpoint.resume={runs.checkpoint(name)}"]
    resumed = step_records(run_distributed(train_and_read_metrics, processes, resume, str(tmp_path / "b"))[0])
    uninterrupted = {r["step"]: r for r in step_records(runs(name))}
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for record in resumed:
        for key in ("loss", "grad_norm", "lr"):
            assert record[key] == uninterrupted[record["step"]][key], f"{key} at step {record['step']}"
    summary = json.loads((tmp_path / "b" / "run_summary.json").read_text())
    assert summary["resumed_from"]["how"] == "same layout"


RESHARDS = {
    # name: (source run, processes, target layout, model overrides of both)
    "ep2-to-ep1": ("ep2", 1, [], []),
    "ep1-to-ep4-zero2": ("one", 4, ["parallel.ep=4", "parallel.zero_stage=2"], []),
    "ep2-pp2-to-ep2-tp2": ("ep2-pp2", 4, ["parallel.ep=2", "parallel.tp=2"], FOUR_BLOCKS),
}


@pytest.mark.parametrize("name", list(RESHARDS))
def test_resharded_moe_resume_carries_every_expert_and_its_adam_moments(name, runs, tmp_path):
    """Across EP, ZeRO, TP and PP: every rank's live fp32 masters, Adam moments, module weights and
    router bias are bitwise the layout-free cache's (its EP slice of each expert), and training on
    continues the uninterrupted run within the layout tolerance. Stale or zeroed expert moments (the
    universal-checkpoint failure) or another EP rank's experts move the losses of steps 4-6 by far
    more than RTOL."""
    from training_runs import resume_and_compare_with_cache

    source, processes, target, model = RESHARDS[name]
    overrides = [*MOE, *SAVE_AT_3, *model, *target, f"checkpoint.resume={runs.checkpoint(source)}"]
    results = run_distributed(resume_and_compare_with_cache, processes, overrides, str(tmp_path / "b"), True)
    for result in results:
        assert result["differ"] == {**NOTHING_DIFFERS, "buffers": 0}, result["rank"]
    uninterrupted = {r["step"]: r for r in step_records(runs(source))}
    resumed = step_records(results[0]["records"])
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for record in resumed:
        ref = uninterrupted[record["step"]]
        assert record["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert record["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"grad norm at {ref['step']}"
    summary = json.loads((tmp_path / "b" / "run_summary.json").read_text())
    assert summary["resumed_from"]["how"].startswith("resharded from")


NOTHING_DIFFERS = {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0, "module": 0}

# Three fp32 steps in two layouts: gradients agree to ~1e-7, but Adam divides by sqrt(exp_avg_sq),
# which amplifies that where second moments are tiny. Observed, each tensor's difference from one
# process's in norm, relative to its norm: up to 5e-6 (EP 2, EP 4, PP, ZeRO-2) and 1.6e-4 (EP 2 x TP 2,
# which reorders more reductions). Another EP rank's experts, a duplicated slice or zeroed moments
# are off by about 1.
STATE_RTOL = 2e-3


def state_of(checkpoint):
    """Every parameter's fp32 master and moments and every buffer, as the checkpoint reader gives them."""
    from pretrain.checkpoint.deepspeed_reader import DeepSpeedCheckpoint
    from pretrain.convert.source import run_config

    reader = DeepSpeedCheckpoint(checkpoint, run_config(checkpoint))
    state = {kind: dict(reader.tensors(kind)) for kind in ("fp32", "exp_avg", "exp_avg_sq")}
    parameters = set(state["fp32"])
    state["buffers"] = {n: t for n, t in reader.stored_tensors() if n not in parameters}
    return state


def assert_states_close(ours, reference):
    assert set(ours) == set(reference)
    for kind, tensors in reference.items():
        assert set(ours[kind]) == set(tensors), kind
        for name, expected in tensors.items():
            difference = (ours[kind][name] - expected).norm()
            assert difference <= STATE_RTOL * expected.norm(), f"{kind} of {name}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reader_gathers_every_expert_from_the_ep_ranks_partitions(name, runs):
    """The checkpoint reader (behind resharding and to-fp32) gives each EP layout's experts, their
    Adam moments and the router bias as one process trained them."""
    reference = "one-4" if LAYOUTS[name][2] else "one"
    ours, expected = state_of(runs.checkpoint(name)), state_of(runs.checkpoint(reference))
    assert_states_close(ours, expected)
    assert any(t.abs().max() > 0 for t in expected["buffers"].values())  # the bias did move
    expert = expected["exp_avg"]["blocks.1.mlp.experts.gate_proj"]
    assert all(e.abs().max() > 0 for e in expert)  # every expert has moments to lose


def test_to_fp32_consolidates_an_ep_checkpoint_that_an_ep_run_starts_from(runs, tmp_path):
    """to-fp32 of an EP2 checkpoint: the one-process model's weights and router bias; a run started
    from them at EP2 computes the same first loss as one process started from them."""
    from pretrain.convert import commands
    from pretrain.errors import ConversionError
    from pretrain.weights.consolidated import ConsolidatedWeights

    out = tmp_path / "moe.safetensors"
    commands.to_fp32(runs.checkpoint("ep2"), out)
    weights = dict(ConsolidatedWeights(out).items())
    expected = state_of(runs.checkpoint("one"))
    assert_states_close({"fp32": {n: weights[n] for n in expected["fp32"]}, "buffers": {
        n: weights[n] for n in expected["buffers"]}}, {"fp32": expected["fp32"], "buffers": expected["buffers"]})  # fmt: skip
    start = [*MOE, "train.steps=1", f"checkpoint.init_weights={out}"]
    first = {
        ep: step_records(run_distributed(train_and_read_metrics, ep, [*start, f"parallel.ep={ep}"], str(tmp_path / f"ep{ep}"))[0])
        for ep in (1, 2)
    }  # fmt: skip
    assert first[2][0]["loss"] == pytest.approx(first[1][0]["loss"], rel=RTOL)
    assert first[1][0]["loss"] < 5.5  # trained weights (step 1 from scratch: 5.8), not a fresh init
    # Softmax scores with a moving router bias: no Hugging Face class chooses experts that way.
    with pytest.raises(ConversionError, match="to-fp32") as refused:
        commands.to_hf(out, tmp_path / "hf")
    assert "mixture-of-experts" in str(refused.value) and not (tmp_path / "hf").exists()


def test_resuming_with_another_expert_layout_of_the_model_is_refused(runs, tmp_path):
    from training_runs import resume_expecting_error

    resume = [*MOE, "model.moe.num_experts=8", f"checkpoint.resume={runs.checkpoint('ep2')}"]
    (message,) = run_distributed(resume_expecting_error, 1, resume, str(tmp_path / "b"))
    assert "model.moe.num_experts: the weights have 4, the config has 8" in message


def test_rollback_with_experts_reloads_each_ranks_experts_and_skips_the_bad_batch(tmp_path):
    """The rollback policy under EP2: back to the step-4 checkpoint (per-rank experts and router
    bias included), then steps 5 and 6 bitwise those of a run that never met the bad batch."""
    from training_runs import train_skipping_batch, train_with_poisoned_batch

    policy = [
        *MOE,
        "parallel.ep=2",
        "train.on_nonfinite=rollback",
        "checkpoint.interval=2",
        "checkpoint.keep_last=0",
    ]
    bad = 4 * 8  # the batch of step 5 (global batch 8)
    (rank0, _) = run_distributed(train_with_poisoned_batch, 2, policy, str(tmp_path / "rollback"), bad)
    assert rank0["error"] is None
    events = [r for r in rank0["records"] if r.get("event")]
    assert [(e["step"], e["event"], e["rolled_back_to"]) for e in events] == [(5, "nonfinite_rollback", 4)]
    reference = step_records(run_distributed(train_skipping_batch, 2, policy, str(tmp_path / "ref"), bad)[0])
    expected = {r["step"]: r for r in reference}
    steps = {r["step"]: r for r in step_records(rank0["records"])}
    for step in (5, 6):
        assert steps[step]["loss"] == expected[step]["loss"], step
        assert steps[step]["grad_norm"] == expected[step]["grad_norm"], step


def test_replica_check_compares_expert_slices_only_where_they_are_copies(tmp_path):
    """DP 4 x EP 2: the experts differ between the two expert-parallel ranks by design (not reported);
    a drift of one rank's expert slice is reported against its expert-data-parallel peer. (Drifted
    after step 4's update, just before its check: ZeRO rewrites the module weights from the fp32
    masters at every step.)"""
    from parallel_checks import replica_check_after_drift

    expert = "blocks.1.mlp.experts.gate_proj"
    records = run_distributed(
        replica_check_after_drift, 4, [*MOE, "parallel.ep=2"], str(tmp_path), 0, expert, 4
    )[0]
    by_step = {r["step"]: r["replica_divergence"] for r in records}
    assert by_step[2] == []
    assert len(by_step[4]) == 1 and by_step[4][0].startswith(f"{expert}: expert-data-parallel copies differ")
