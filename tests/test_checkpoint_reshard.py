"""Resharding reads only what each rank holds, and resumes bf16, ZeRO-2 with TP and sequence
parallelism on course (real trainer and DeepSpeed engines on CPU processes, gloo).

Bytes: the cache holds 12 bytes per parameter (fp32 master and Adam's two moments). Before, every
rank of every layout read all of it; now a rank reads its TP slice, and of that, under ZeRO, only
what its partition holds (see pretrain/checkpoint/reshard.py for the table). The counter is the
reader's own (`CacheReads`, tensor bytes handed out by safetensors slices); the ZeRO-0 control shows
what it reports for whole reads, which is what every rank read before this change.

Numbers: a resumed engine's fp32 masters, moments and module weights are compared with the cache
bitwise, and the resumed run's losses with the uninterrupted run's within the tolerances written
next to each comparison.
"""

import json

import pytest

from pretrain.testing import run_distributed
from training_runs import resume_and_compare_with_cache, step_records, train_and_read_metrics

pytestmark = pytest.mark.slow

SAVE = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0", "train.eval_interval=0"]
RTOL = 2e-5  # fp32 layouts: the layout tolerance of tests/test_parallel_layouts.py, see test_checkpoint_resume.py

SOURCES = {
    # name: (processes, layout overrides)
    "dp1": (1, ["parallel.zero_stage=0"]),
    "bf16-dp2-zero1": (2, ["parallel.zero_stage=1", "train.precision=bf16"]),
    "tp2-zero2": (2, ["parallel.tp=2", "parallel.zero_stage=2"]),
    "tp2-sp-zero1": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]),
}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """source_run(name) -> (step-3 checkpoint, metrics by step) of an uninterrupted 6-step run."""
    cache = {}

    def get(name):
        if name not in cache:
            processes, layout = SOURCES[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            records = run_distributed(train_and_read_metrics, processes, [*SAVE, *layout], str(run_dir))[0]
            checkpoint = run_dir / "checkpoints" / "step00000003"
            cache[name] = (checkpoint, {r["step"]: r for r in step_records(records)})
        return cache[name]

    return get


def resumed_state(processes, layout, checkpoint, run_dir):
    overrides = [*SAVE, *layout, f"checkpoint.resume={checkpoint}"]
    return run_distributed(resume_and_compare_with_cache, processes, overrides, str(run_dir))


NOTHING_DIFFERS = {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0, "module": 0}
# A partition boundary inside a row makes the reader take that whole row: at most one partial row at
# each end, of at most 128 floats here, per parameter and kind (at most 21 x 3 x 2 x 512 bytes, under
# 1% of this 115k-parameter model's 1.38 MB cache).
PARTIAL_ROWS = 0.01
# The vocabulary (320 rows) is padded to 384 for TP 1 and split as padded: at DP 2 rank 0's half of
# the embedding and head holds 192 real rows, rank 1's 128 real and 64 padding rows, which are not
# read. Embedding and head are 36% of the parameters, so a rank's share moves by up to 0.036 from 1/2.
VOCAB_PADDING = 0.04


def read_bytes(result, kinds=("fp32", "exp_avg", "exp_avg_sq")):
    return sum(result["reads"]["read"][k] for k in kinds)


def test_zero3_ranks_each_read_half_of_the_cache(source_run, tmp_path):
    checkpoint, _ = source_run("dp1")
    results = resumed_state(2, ["parallel.zero_stage=3"], checkpoint, tmp_path / "run")
    for result in results:
        assert result["differ"] == NOTHING_DIFFERS, result["rank"]
        # What a rank reads is what its partition holds (never more, but for the partial rows) ...
        assert read_bytes(result) <= result["held"] * (1 + PARTIAL_ROWS), result
        # ... which is about half the cache (the old whole-tensor reads: 1.0 on each rank).
        assert result["reads"]["fraction"] == pytest.approx(1 / 2, abs=VOCAB_PADDING), result["reads"]
    # Together the ranks read every byte, and once, up to the partial rows.
    cache = sum(results[0]["reads"]["cache"].values())
    assert cache <= sum(read_bytes(r) for r in results) <= cache * (1 + PARTIAL_ROWS)


def test_zero1_ranks_read_half_of_the_moments_and_all_masters(source_run, tmp_path):
    """ZeRO-1 replicates the module weights over data-parallel ranks: each needs the whole master."""
    checkpoint, _ = source_run("dp1")
    results = resumed_state(2, ["parallel.zero_stage=1"], checkpoint, tmp_path / "run")
    moments = ("exp_avg", "exp_avg_sq")
    for result in results:
        assert result["differ"] == NOTHING_DIFFERS, result["rank"]
        reads = result["reads"]
        assert reads["read"]["fp32"] == reads["cache"]["fp32"]
        assert read_bytes(result, moments) <= result["held"] * 2 / 3 * (1 + PARTIAL_ROWS), result
        share = read_bytes(result, moments) / sum(reads["cache"][k] for k in moments)
        assert share == pytest.approx(1 / 2, abs=VOCAB_PADDING), reads
    cache = sum(results[0]["reads"]["cache"][k] for k in moments)
    assert cache <= sum(read_bytes(r, moments) for r in results) <= cache * (1 + PARTIAL_ROWS)


def test_replicated_optimizer_reads_everything_the_way_every_rank_used_to(source_run, tmp_path):
    """The control: ZeRO-0 at DP 2 holds the whole optimizer state on each rank, so each reads all of
    the cache, which is what every rank read in every layout before."""
    checkpoint, _ = source_run("dp1")
    for result in resumed_state(2, ["parallel.zero_stage=0"], checkpoint, tmp_path / "run"):
        assert result["differ"] == NOTHING_DIFFERS, result["rank"]
        assert result["reads"]["read"] == result["reads"]["cache"]


def test_tensor_parallel_zero3_ranks_read_what_they_hold(source_run, tmp_path):
    """TP 2 x DP 2, ZeRO-3: a TP slice, then half of it. The vocabulary is padded to 512 rows for TP 2,
    so the shares are uneven (TP rank 1 holds 64 real rows of 256); the norms are replicated over TP
    ranks and read by both (0.3% of the cache)."""
    checkpoint, _ = source_run("dp1")
    results = resumed_state(4, ["parallel.tp=2", "parallel.zero_stage=3"], checkpoint, tmp_path / "run")
    for result in results:
        assert result["differ"] == NOTHING_DIFFERS, result["rank"]
        assert read_bytes(result) <= result["held"] * (1 + PARTIAL_ROWS), result
        assert result["reads"]["fraction"] < 1 / 3, result["reads"]
    cache = sum(results[0]["reads"]["cache"].values())
    assert cache <= sum(read_bytes(r) for r in results) <= cache * (1 + PARTIAL_ROWS)


def resume(processes, layout, checkpoint, run_dir):
    overrides = [*SAVE, *layout, f"checkpoint.resume={checkpoint}"]
    records = run_distributed(train_and_read_metrics, processes, overrides, str(run_dir))[0]
    return {r["step"]: r for r in step_records(records)}


# bf16 against bf16: the resumed layout rounds weights and activations to bf16 in other places than
# the source layout (ZeRO-3 gathers bf16 shards, one rank accumulates what two reduced), so the losses
# differ by bf16 rounding, not by the 1e-7 of fp32 layouts. Observed over steps 4-6 (relative):
# bf16 DP 2 ZeRO-1 -> bf16 DP 1 ZeRO-3: 1.6e-5 loss, 4.3e-4 grad norm; bounds ~12x that.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 2e-4, 5e-3
# Across precision the resumed fp32 run is compared with the bf16 run it continues, so the bf16-vs-fp32
# drift counts: observed 3.6e-4 loss, 1.3e-3 grad norm (bf16 -> fp32 DP 2 ZeRO-3); the bounds are the
# bf16-against-fp32 tolerances of tests/test_engine_equivalence.py. The masters and moments themselves
# are checked bitwise by test_resharded_state_is_the_cache_bitwise.
CROSS_LOSS_RTOL, CROSS_GRAD_RTOL = 2e-3, 1e-2
# fp32 -> fp32 (observed <= 2e-7): RTOL above.

RESHARD = {
    # name: (source, processes, target layout, (loss rtol, grad norm rtol))
    "bf16-dp2-zero1-to-bf16-dp1-zero3": (
        "bf16-dp2-zero1",
        1,
        ["parallel.zero_stage=3", "train.precision=bf16"],
        (BF16_LOSS_RTOL, BF16_GRAD_RTOL),
    ),
    "bf16-dp2-zero1-to-fp32-dp2-zero3": (
        "bf16-dp2-zero1",
        2,
        ["parallel.zero_stage=3", "train.precision=fp32"],
        (CROSS_LOSS_RTOL, CROSS_GRAD_RTOL),
    ),
    "tp2-zero2-to-dp2-zero1": ("tp2-zero2", 2, ["parallel.zero_stage=1"], (RTOL, RTOL)),
    "tp2-sp-zero1-to-dp2-zero3": ("tp2-sp-zero1", 2, ["parallel.zero_stage=3"], (RTOL, RTOL)),
}


@pytest.mark.parametrize("name", list(RESHARD))
def test_resharded_resume_continues_the_run(name, source_run, tmp_path):
    source, processes, layout, (loss_rtol, grad_rtol) = RESHARD[name]
    checkpoint, uninterrupted = source_run(source)
    resumed = resume(processes, layout, checkpoint, tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=loss_rtol), step
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=grad_rtol), (
            step
        )
        assert resumed[step]["lr"] == pytest.approx(uninterrupted[step]["lr"], rel=1e-12)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["resumed_from"]["how"].startswith("resharded from")
    assert "of the cache's" in summary["resumed_from"]["how"]  # the bytes read, in the log line too


STATE_CHECKS = {
    # name: (source, processes, target layout)
    "bf16-dp2-zero1-to-bf16-dp2-zero3": (
        "bf16-dp2-zero1",
        2,
        ["parallel.zero_stage=3", "train.precision=bf16"],
    ),
    "tp2-zero2-to-bf16-dp2-zero3": ("tp2-zero2", 2, ["parallel.zero_stage=3", "train.precision=bf16"]),
    "tp2-sp-zero1-to-bf16-tp2-dp2-zero2": (
        "tp2-sp-zero1",
        4,
        ["parallel.tp=2", "parallel.zero_stage=2", "train.precision=bf16"],
    ),
}


@pytest.mark.parametrize("name", list(STATE_CHECKS))
def test_resharded_state_is_the_cache_bitwise(name, source_run, tmp_path):
    """The masters, moments and module weights an engine gets are the cache's exactly (bf16 module
    weights: the masters rounded), and its moments come from no more than its partition holds."""
    source, processes, layout = STATE_CHECKS[name]
    checkpoint, _ = source_run(source)
    for result in resumed_state(processes, layout, checkpoint, tmp_path / "run"):
        assert result["differ"] == NOTHING_DIFFERS, result["rank"]
        moments = read_bytes(result, ("exp_avg", "exp_avg_sq"))
        assert moments <= result["held"] * 2 / 3 * (1 + PARTIAL_ROWS), result
