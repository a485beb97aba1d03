"""Resuming through the real trainer and DeepSpeed engines on CPU processes (gloo).

Exact resume: a run trains 6 steps and saves at step 3 (saving does not disturb it); a second run
in a fresh process group resumes from that checkpoint and trains steps 4-6. Same layout, fp32 on
CPU, so the loss, gradient norm and LR of steps 4-6 must be bitwise the uninterrupted run's.

Resharding: the same checkpoints resumed in another layout (DP 2 -> 1 -> 4, TP 2 <-> 1, PP 2 <-> 1,
ZeRO-1 -> 3). Every layout computes the single-process numbers within the layout tolerance of
tests/test_parallel_layouts.py (2e-5 relative: fp32 reordering of reductions, ~1e-7 per step
observed), so a resharded resume that kept the weights, the fp32 masters, Adam's moments and
step, the schedule and the data position matches the uninterrupted run within it too. Losing the
moments alone moves the loss of step 5 by about 1e-2 (AdamW's first update after fresh moments is
a sign step of size lr), 500 times the tolerance.
"""

import json

import pytest

from pretrain.testing import run_distributed
from training_runs import step_records, train_and_read_metrics

pytestmark = pytest.mark.slow

RTOL = 2e-5  # see the module docstring
SAVE = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0", "train.eval_interval=0"]

SOURCES = {
    # name: (processes, layout overrides)
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """source_run(name) -> (run dir, metrics by step) of an uninterrupted 6-step run saving at step 3."""
    cache = {}

    def get(name):
        if name not in cache:
            processes, layout = SOURCES[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            records = run_distributed(train_and_read_metrics, processes, [*SAVE, *layout], str(run_dir))[0]
            cache[name] = (run_dir, {r["step"]: r for r in step_records(records)})
        return cache[name]

    return get


def resume(processes, layout, checkpoint, run_dir, extra=()):
    overrides = [*SAVE, *layout, f"checkpoint.resume={checkpoint}", *extra]
    records = run_distributed(train_and_read_metrics, processes, overrides, str(run_dir))[0]
    return {r["step"]: r for r in step_records(records)}


@pytest.mark.parametrize("name", list(SOURCES))
def test_resume_continues_bitwise_like_the_uninterrupted_run(name, source_run, tmp_path):
    source_dir, uninterrupted = source_run(name)
    processes, layout = SOURCES[name]
    resumed = resume(processes, layout, source_dir / "checkpoints" / "step00000003", tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]  # steps 1-3 were not trained again
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == uninterrupted[step][key], f"{key} at step {step}"
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["resumed_from"]["step"] == 3 and summary["resumed_from"]["how"] == "same layout"


RESHARD = {
    # name: (source, processes, target layout); with the DP 2 -> 1 -> 4 chain below, every change
    # the issue names: DP 2 -> 1 -> 4, TP 2 <-> 1, PP 2 <-> 1, and the ZeRO stage both ways.
    "tp2-to-tp1": ("tp2", 1, []),
    "pp2-to-pp1": ("pp2", 1, []),
    "zero1-to-tp2-zero3": ("dp2-zero1", 2, ["parallel.tp=2", "parallel.zero_stage=3"]),
    "zero3-to-tp2-pp2-zero1": ("dp2-zero3", 4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"]),
}


@pytest.mark.parametrize("name", list(RESHARD))
def test_resharded_resume_continues_the_run(name, source_run, tmp_path):
    source, processes, layout = RESHARD[name]
    source_dir, uninterrupted = source_run(source)
    checkpoint = source_dir / "checkpoints" / "step00000003"
    resumed = resume(processes, layout, checkpoint, tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=RTOL), (
            f"loss at {step}"
        )
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=RTOL)
        assert resumed[step]["lr"] == pytest.approx(uninterrupted[step]["lr"], rel=1e-12)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["resumed_from"]["how"].startswith("resharded from")
    assert (checkpoint / "universal" / "manifest.json").is_file()  # the cache, beside the checkpoint


def test_data_parallel_size_2_to_1_to_4_keeps_the_run_on_course(source_run, tmp_path):
    """A chain of resumes, each from the previous run's checkpoint: DP 2 (step 3) -> 1 (step 4) -> 4."""
    source_dir, uninterrupted = source_run("dp2-zero1")
    one = resume(
        1, [], source_dir / "checkpoints" / "step00000003", tmp_path / "dp1", ["checkpoint.interval=2"]
    )
    four = resume(4, [], tmp_path / "dp1" / "checkpoints" / "step00000004", tmp_path / "dp4")
    assert sorted(one) == [4, 5, 6] and sorted(four) == [5, 6]
    for step, record in [*one.items(), *four.items()]:
        assert record["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=RTOL), f"loss at {step}"
        assert record["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=RTOL)


def test_deepspeeds_universal_checkpoint_tool_reads_our_checkpoints(source_run, tmp_path):
    """DeepSpeed's own `ds_to_universal`, guided by the universal_checkpoint_info we save, merges our
    TP shards and pipeline stages into exactly the tensors our resharding cache holds."""
    import subprocess
    import sys

    import torch

    from pretrain.checkpoint.deepspeed_reader import DeepSpeedCheckpoint
    from pretrain.config import load_config
    from pretrain.model.names import layer_parameters
    from pretrain.parallel.pipeline import engine_parameter_names

    source_dir, _ = source_run("tp2-pp2")  # TP shards to merge, pipeline stages and their names
    checkpoint = source_dir / "checkpoints" / "step00000003"
    out = tmp_path / "universal"
    subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
         "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    cfg = load_config(checkpoint / "config.yaml")
    ours = DeepSpeedCheckpoint(checkpoint, cfg)
    names = engine_parameter_names(cfg, pipelined=cfg.parallel.pp > 1)
    compared = 0
    for index, params in layer_parameters(cfg.model):
        for param, shape in params:
            for kind in ("fp32", "exp_avg", "exp_avg_sq"):
                theirs = torch.load(out / "zero" / names[param] / f"{kind}.pt", weights_only=False)["param"]
                assert torch.equal(theirs, ours.tensor(index, param, shape, kind)), (param, kind)
                compared += 1
    assert compared == 3 * 21  # every parameter of the 2-block model, vocabulary padding stripped
