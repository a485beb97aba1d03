"""Data parallelism under every ZeRO stage computes what one process computes on the same global batch."""

import pytest

from pretrain.testing import run_distributed
from pretrain.testing.distributed import DistributedTestError
from training_runs import step_records, train_and_read_metrics, train_compiled

pytestmark = pytest.mark.slow

# fp32 on CPU. The runs differ only in how gradients are summed: one process accumulates 4
# micro-batches, two processes accumulate 2 each and all-reduce (ZeRO-2/3: reduce-scatter in buckets).
# Reordered fp32 sums differ by ~1e-7 relative; over 6 Adam steps the observed spread was at most
# 1e-7 (loss) and 7e-7 (grad norm) relative. 2e-5 is ~30x that and far below any real bug (a wrong
# averaging factor or a dropped micro-batch moves the loss by >1e-2 within 2 steps).
RTOL = 2e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    (records,) = run_distributed(train_and_read_metrics, 1, ["parallel.zero_stage=0"], str(run_dir))
    return step_records(records)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_on_two_ranks_matches_one_process(stage, reference, tmp_path):
    records, _ = run_distributed(train_and_read_metrics, 2, [f"parallel.zero_stage={stage}"], str(tmp_path))
    records = step_records(records)
    assert [r["step"] for r in records] == [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(records, reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), (
            f"grad norm at step {ref['step']}"
        )
        assert ours["lr"] == ref["lr"]
    assert records[-1]["loss"] < records[0]["loss"]


def test_micro_batches_equal_one_big_batch(reference, tmp_path):
    """4 micro-batches of 2 sequences (the reference) == 1 micro-batch of 8, in one process."""
    (records,) = run_distributed(
        train_and_read_metrics, 1, ["parallel.zero_stage=0", "train.micro_batch_size=8"], str(tmp_path)
    )
    for ours, ref in zip(step_records(records), reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)


# bf16 weights and activations round to 8 mantissa bits (~4e-3 relative) while the reference is fp32;
# ZeRO keeps fp32 master weights and, with train.grad_accum_dtype=fp32 (the default; before it, DeepSpeed
# summed bf16 gradients in bf16 although this comment said fp32), accumulates and all-reduces gradients
# in fp32, so the drift stays small: observed at most 1.7e-4 (loss) and 1.7e-3 (grad norm) relative over
# 6 steps (with bf16 sums of 2 micro-batches; tests/test_grad_accum_dtype.py measures the difference
# fp32 sums make over 128). Bounds are ~10x and ~6x that.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 2e-3, 1e-2


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_zero_on_two_ranks_tracks_the_fp32_run(stage, reference, tmp_path):
    overrides = [f"parallel.zero_stage={stage}", "train.precision=bf16"]
    records, _ = run_distributed(train_and_read_metrics, 2, overrides, str(tmp_path))
    for ours, ref in zip(step_records(records), reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=BF16_LOSS_RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=BF16_GRAD_RTOL)


def test_bf16_without_zero_is_refused_with_the_alternative(tmp_path):
    with pytest.raises(
        DistributedTestError, match=r"bf16 with parallel.zero_stage=0.*Use parallel.zero_stage=1"
    ):
        run_distributed(
            train_and_read_metrics, 1, ["parallel.zero_stage=0", "train.precision=bf16"], str(tmp_path)
        )


# torch.compile (inductor) fuses the norms, rotary and SwiGLU of each block and reorders their fp32
# reductions; observed over 6 steps on CPU at most 2e-7 (loss) and 3e-7 (grad norm) relative against
# eager, the same size as the reordering between ZeRO stages, so the same RTOL applies. A block that
# computed anything else (a missed rotary, a wrong recompute) is off by >1e-2 at the first step.
def test_compiled_blocks_train_what_the_eager_model_trains(reference, tmp_path):
    (result,) = run_distributed(train_compiled, 1, ["parallel.zero_stage=0"], str(tmp_path))
    records, graphs = result
    assert graphs >= 1, "train.compile=true compiled nothing"
    for ours, ref in zip(step_records(records), reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
