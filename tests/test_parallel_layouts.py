"""Every DP x TP x PP layout trains what one process trains: same model, data and global batch,
losses and gradient norms compared step by step (the real trainer, DeepSpeed engines, gloo)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from parallel_checks import ISSUE_LAYOUTS, zero_partitioning
from pretrain.testing import run_distributed
from training_runs import step_records, train_and_read_metrics

pytestmark = pytest.mark.slow

# fp32 on CPU, 6 steps. Pipeline stages compute exactly the single-process operations (observed:
# identical losses); tensor parallelism splits the row-parallel matmuls and the softmax sums in two
# and data parallelism the gradient sums, which reorders fp32 additions (~1e-7 relative per step).
# Observed over all layouts below: <= 2e-7 (loss) and <= 1e-6 (grad norm) relative. 2e-5 leaves
# ~20x headroom and is far below any real bug: a missing or doubled all-reduce, a replicated
# parameter counted twice in the norm, or a wrong shard moves the loss or the norm by > 1e-3 at once.
RTOL = 2e-5

LAYOUTS = {
    **ISSUE_LAYOUTS,
    # Our own global-norm clipping (fp32 without ZeRO) with a tied embedding on two stages, sequence
    # parallelism between TP regions, and recomputation inside the blocks.
    "tied-tp2-pp2-sp-zero0": (
        4,
        [
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.sequence_parallel=true",
            "parallel.zero_stage=0",
            "parallel.activation_checkpointing=selective",
        ],
        ["model.tie_embeddings=true"],
    ),
    "tp2-zero3": (2, ["parallel.tp=2", "parallel.zero_stage=3"], []),
    # Qwen3-style attention (per-head q/k norms, heads wider than hidden / heads): the norms' weights
    # are replicated but each tensor-parallel rank normalises only its own heads.
    "qk-norm-tp2-sp": (
        2,
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        ["model.qk_norm=true", "model.head_dim=24"],
    ),
    "pp2-balanced-full-recompute": (
        2,
        ["parallel.pp=2", "parallel.pipeline_partition=parameters", "parallel.activation_checkpointing=full"],
        [],
    ),
}

_references: dict[tuple[str, ...], list[dict]] = {}


def reference(model_overrides: list[str], tmp_path_factory) -> list[dict]:
    """The single-process run (ZeRO-1, as the tiny preset) of the same model, cached per model."""
    key = tuple(model_overrides)
    if key not in _references:
        run_dir = tmp_path_factory.mktemp("reference")
        (records,) = run_distributed(train_and_read_metrics, 1, [*model_overrides], str(run_dir))
        _references[key] = step_records(records)
    return _references[key]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_the_single_process_run(name, tmp_path, tmp_path_factory):
    processes, layout, model = LAYOUTS[name]
    expected = reference(model, tmp_path_factory)
    records = step_records(
        run_distributed(train_and_read_metrics, processes, [*layout, *model], str(tmp_path))[0]
    )
    assert [r["step"] for r in records] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(records, expected, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), (
            f"grad norm at step {ref['step']}"
        )
        assert ours["lr"] == ref["lr"]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5


# bf16 (DeepSpeed's bf16 optimizer under a pipeline: fp32 master weights, and with ZeRO-1 gradients
# accumulated and reduced in fp32 as train.grad_accum_dtype=fp32 asks; without ZeRO DeepSpeed can only
# sum them in bf16, which this comment once called fp32) against the fp32 reference: rounding to 8
# mantissa bits moves the loss by ~1e-4 relative in 6 steps (observed <= 4e-4 loss, <= 1e-3 grad norm,
# pipeline without ZeRO); the bounds are those of the data-parallel bf16 tests in
# test_engine_equivalence.py.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 2e-3, 1e-2


@pytest.mark.parametrize(
    "layout",
    [["parallel.pp=2", "parallel.zero_stage=1"], ["parallel.tp=2", "parallel.zero_stage=1"]],
    ids=["pp2-zero1", "tp2-zero1"],
)
def test_bf16_layout_tracks_the_fp32_single_process_run(layout, tmp_path, tmp_path_factory):
    expected = reference([], tmp_path_factory)
    records = step_records(
        run_distributed(train_and_read_metrics, 2, [*layout, "train.precision=bf16"], str(tmp_path))[0]
    )
    for ours, ref in zip(records, expected, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=BF16_LOSS_RTOL), f"loss at step {ref['step']}"
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=BF16_GRAD_RTOL)


def test_zero_shards_optimizer_state_over_the_data_parallel_group_only(tmp_path):
    """DP 2 x TP 2, ZeRO-1: each TP shard's optimizer state is split over its 2 data-parallel peers,
    not over all 4 ranks (the peers hold different weights)."""
    for result in run_distributed(
        zero_partitioning, 4, ["parallel.tp=2", "parallel.zero_stage=1"], str(tmp_path)
    ):
        assert set(result["partition_count"]) == {2}
        assert (
            result["dp_group_ranks"] == result["expected_dp_ranks"] and len(result["expected_dp_ranks"]) == 2
        )


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_deepspeed_launcher_trains_the_tiny_preset_in_3d_like_one_process(tmp_path):
    """The user's command: `deepspeed --num_gpus 4 pretrain/main.py --config configs/tiny.yaml
    parallel.tp=2 parallel.pp=2` gives the losses of `python pretrain/main.py` on the same config."""
    from pretrain.parallel.distributed import free_port

    common = ["--config", str(TINY), "train.steps=6", "logging.interval=1", "train.eval_interval=0",
              "checkpoint.save_final=false", "logging.plot=false", "logging.tensorboard=false"]  # fmt: skip
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    launched = _launch(
        deepspeed, "--num_gpus", "4", "--master_port", str(free_port()), "pretrain/main.py", *common,
        "parallel.tp=2", "parallel.pp=2", f"run.dir={tmp_path / '3d'}",
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "layout: data-parallel 1 x tensor-parallel 2 x pipeline-parallel 2, ZeRO-1" in launched.stdout
    single = _launch(sys.executable, "pretrain/main.py", *common, f"run.dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ours, ref = _losses(tmp_path / "3d"), _losses(tmp_path / "one")
    assert sorted(ours) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step, loss in ref.items():
        assert ours[step] == pytest.approx(loss, rel=RTOL), f"loss at step {step}"
    summary = json.loads((tmp_path / "3d" / "run_summary.json").read_text())
    assert summary["pipeline_stage_boundaries"] == [0, 3, 7]  # embedding + 2 blocks | 2 blocks + norm + head
    assert summary["padded_vocab_size"] == 512  # 320 rounded up to a multiple of 128 x tp 2


@pytest.mark.parametrize(
    ("overrides", "world_size", "expected"),
    [
        (["parallel.tp=3"], 4, "model.num_heads (4) must be divisible by parallel.tp (3)"),
        (["parallel.pp=2", "parallel.zero_stage=3"], 4, "Use parallel.zero_stage=1, or parallel.pp=1"),
        (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp x parallel.pp"),
    ],
)
def test_impossible_layout_fails_before_anything_is_built(overrides, world_size, expected, tmp_path):
    """Rank 0 of a launch of `world_size` processes: exit code 2 and the reason, before the process
    group, the model or the run directory exist."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run(
        [sys.executable, "pretrain/main.py", "--config", str(TINY), *overrides, f"run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()
