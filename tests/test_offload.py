"""Optimizer offload (DeepSpeed's CPU Adam on host-memory partitions) through the real trainer and
DeepSpeed engines on CPU processes (gloo): it trains what the device optimizer trains, resumes
bitwise in its own layout, and reshards to and from layouts without offload."""

import json

import pytest

from offload_runs import train_and_describe_optimizer
from pretrain.testing import run_distributed
from training_runs import step_records, train_and_read_metrics

pytestmark = pytest.mark.slow

# fp32 on CPU. Against the one-process reference the offloaded runs differ in the order of their
# gradient sums (as every layout does, ~1e-7 relative per step: tests/test_engine_equivalence.py) and
# in the update's arithmetic: CPU Adam's SIMD kernel folds the bias corrections into the step size and
# takes sqrt(v)/sqrt(1-beta2^t) where torch divides first, about one fp32 rounding (6e-8) per update.
# Observed over 6 steps (ZeRO 1-3, 1 and 2 ranks): at most 1e-7 (loss) and 9e-7 (grad norm) relative,
# the spread between ZeRO stages without offload. RTOL is the layouts' 2e-5, 20x that; a wrong weight
# decay, a missed bias correction or an update applied to one group only moves the loss by >1e-3
# within 3 steps.
RTOL = 2e-5

LAYOUTS = {
    # name: (processes, overrides)
    "dp1-zero1": (1, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    (records,) = run_distributed(train_and_read_metrics, 1, ["parallel.zero_stage=0"], str(run_dir))
    return step_records(records)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cpu_offload_trains_with_cpu_adam_what_the_device_optimizer_trains(name, reference, tmp_path):
    processes, layout = LAYOUTS[name]
    overrides = [*layout, "parallel.offload_optimizer=cpu"]
    out = run_distributed(train_and_describe_optimizer, processes, overrides, str(tmp_path))[0]
    assert out["optimizer"] == "DeepSpeedCPUAdam" and out["moment_devices"] == ["cpu"]
    records = step_records(out["records"])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(records, reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"grad norm at {ref['step']}"
        assert ours["lr"] == ref["lr"]
    assert records[-1]["loss"] < records[0]["loss"]


SAVE = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0"]
OFFLOADED = ["parallel.zero_stage=1", "parallel.offload_optimizer=cpu"]  # on 2 processes


def resume(processes, layout, checkpoint, run_dir, extra=()):
    overrides = [*SAVE, *layout, f"checkpoint.resume={checkpoint}", *extra]
    records = run_distributed(train_and_read_metrics, processes, overrides, str(run_dir))[0]
    return {r["step"]: r for r in step_records(records)}


def adam_step_saved(checkpoint):
    """The AdamW step count the checkpoint recorded (compat.adam_step of the live optimizer)."""
    return json.loads((checkpoint / "state.json").read_text())["parts"]["engine"]["adam_step"]


@pytest.fixture(scope="module")
def offloaded_runs(tmp_path_factory):
    """offloaded_runs(stage) -> (checkpoints, metrics by step) of DP 2, ZeRO-`stage`, offloaded:
    6 uninterrupted steps saving at 3 and 6."""
    cache = {}

    def get(stage):
        if stage not in cache:
            run_dir = tmp_path_factory.mktemp(f"offloaded-zero{stage}") / "run"
            layout = [*SAVE, f"parallel.zero_stage={stage}", "parallel.offload_optimizer=cpu"]
            records = run_distributed(train_and_read_metrics, 2, layout, str(run_dir))[0]
            cache[stage] = (run_dir / "checkpoints", {r["step"]: r for r in step_records(records)})
        return cache[stage]

    return get


@pytest.fixture
def offloaded_run(offloaded_runs):
    return offloaded_runs(1)


def test_offloaded_resume_is_bitwise_the_uninterrupted_run(offloaded_run, tmp_path):
    checkpoints, uninterrupted = offloaded_run
    assert adam_step_saved(checkpoints / "step00000003") == 3  # CPU Adam's int counter is read
    resumed = resume(2, OFFLOADED, checkpoints / "step00000003", tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == uninterrupted[step][key], f"{key} at step {step}"
    assert adam_step_saved(tmp_path / "run" / "checkpoints" / "step00000006") == 6


def test_offloaded_checkpoint_reshards_to_zero2_without_offload_and_back(offloaded_run, tmp_path):
    """DP 2 ZeRO-1 offloaded (step 3) -> DP 1 ZeRO-2 on the device (step 4) -> DP 2 ZeRO-1 offloaded.
    Both resumes write full masters and moments into the live engine (compat.set_full_state); losing
    the moments alone moves step 5's loss by ~1e-2 (tests/test_checkpoint_resume.py), 500x RTOL."""
    checkpoints, uninterrupted = offloaded_run
    plain = ["parallel.zero_stage=2", "parallel.offload_optimizer=none"]
    one = resume(1, plain, checkpoints / "step00000003", tmp_path / "dp1", ["checkpoint.interval=2"])
    back = resume(2, OFFLOADED, tmp_path / "dp1" / "checkpoints" / "step00000004", tmp_path / "dp2")
    assert sorted(one) == [4, 5, 6] and sorted(back) == [5, 6]
    for step, record in [*one.items(), *back.items()]:
        assert record["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=RTOL), f"loss at {step}"
        assert record["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=RTOL)
    summary = json.loads((tmp_path / "dp2" / "run_summary.json").read_text())
    assert summary["resumed_from"]["how"].startswith("resharded from")
    assert adam_step_saved(tmp_path / "dp2" / "checkpoints" / "step00000006") == 6


@pytest.mark.parametrize("stage", [1, 3])
def test_offload_switched_off_and_on_at_a_resume_in_the_same_layout(stage, offloaded_runs, tmp_path):
    """DP 2: offloaded (step 3) -> on the device (step 4) -> offloaded. The layout is the same, so
    DeepSpeed loads its own files, written by the other optimizer (torch's AdamW <-> CPU Adam, whose
    param groups and step counters differ: an int and no bias_correction key in torch's)."""
    checkpoints, uninterrupted = offloaded_runs(stage)
    zero = f"parallel.zero_stage={stage}"
    off = resume(2, [zero], checkpoints / "step00000003", tmp_path / "off", ["checkpoint.interval=2"])
    on = resume(2, [zero, "parallel.offload_optimizer=cpu"], tmp_path / "off" / "checkpoints" / "step00000004",
                tmp_path / "on")  # fmt: skip
    assert sorted(off) == [4, 5, 6] and sorted(on) == [5, 6]
    for step, record in [*off.items(), *on.items()]:
        assert record["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=RTOL), f"loss at {step}"
        assert record["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=RTOL)
    summary = json.loads((tmp_path / "on" / "run_summary.json").read_text())
    assert summary["resumed_from"]["how"] == "same layout"
