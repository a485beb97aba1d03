"""When things go wrong: a damaged newest checkpoint, a bad batch (non-finite gradients), a failed
save. Real trainer and DeepSpeed engines on CPU processes."""

import json
import re

import pytest

from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.resume import select_resume_point
from pretrain.config import load_config
from pretrain.errors import CheckpointError
from pretrain.testing import run_distributed
from training_runs import (
    REPO,
    step_records,
    train_and_read_metrics,
    train_skipping_batch,
    train_until_checkpoint_error,
    train_with_poisoned_batch,
    train_with_poisoned_batches,
)

pytestmark = pytest.mark.slow

BATCH = 8  # train.global_batch_size of training_runs.SMALL
SAVE_EVERY_2 = [
    "train.steps=6",
    "checkpoint.interval=2",
    "checkpoint.keep_last=0",
    "checkpoint.save_final=true",
]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 2-rank run with complete checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    records = run_distributed(train_and_read_metrics, 2, SAVE_EVERY_2, str(run_dir))[0]
    return run_dir, {r["step"]: r for r in step_records(records)}


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_every_file_of_the_newest_checkpoint_is_covered_by_the_fallback(saved_run, tmp_path):
    """Truncate each file of step 6 in turn: resuming reports it and picks step 4."""
    source, _ = saved_run
    names = sorted(json.loads((source / "checkpoints/step00000006/manifest.json").read_text())["files"])
    assert len(names) >= 6  # model and optimizer states, RNG of both ranks, state.json, config.yaml
    for name in names:
        run_dir = copy_run(source, tmp_path / name.replace("/", "_"))
        damaged = run_dir / "checkpoints/step00000006" / name
        damaged.write_bytes(damaged.read_bytes()[:-1])
        cfg = load_config(REPO / "configs/tiny.yaml", [f"run.dir={run_dir}"])
        messages = []
        point = select_resume_point(cfg, StepAgreement(1), 0, 1, messages.append)
        assert point is not None and point.step == 4, name
        assert messages == [
            f"skipping {run_dir}/checkpoints/step00000006: {name} has {damaged.stat().st_size:,} bytes, the "
            f"manifest says {damaged.stat().st_size + 1:,}; trying the previous checkpoint"
        ]


@pytest.mark.parametrize("text", ["[]", "{}", '{"format": "pretrain-checkpoint-v1", "files": {"a": 1}}'])
def test_a_manifest_that_is_valid_json_but_no_manifest_falls_back_like_a_truncated_one(
    saved_run, tmp_path, text
):
    source, _ = saved_run
    run_dir = copy_run(source, tmp_path / "run")
    (run_dir / "checkpoints/step00000006/manifest.json").write_text(text)
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.dir={run_dir}"])
    messages = []
    point = select_resume_point(cfg, StepAgreement(1), 0, 1, messages.append)
    assert point is not None and point.step == 4
    assert "step00000006: manifest.json" in messages[0] and "trying the previous checkpoint" in messages[0]


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(saved_run, tmp_path):
    source, _ = saved_run
    run_dir = copy_run(source, tmp_path / "run")
    for step in (2, 4, 6):
        damaged = run_dir / f"checkpoints/step{step:08d}/mp_rank_00_model_states.pt"
        damaged.write_bytes(damaged.read_bytes()[:-1])
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.dir={run_dir}"])
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged") as error:
        select_resume_point(cfg, StepAgreement(1), 0, 1, print)
    assert error.value.exit_code == 5
    assert "step00000002: mp_rank_00_model_states.pt has" in str(error.value)
    assert "checkpoint.resume=none run.overwrite=true" in str(error.value)
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before  # kept for inspection


def test_a_corrupt_byte_is_caught_by_the_checksums_on_every_rank(saved_run, tmp_path):
    source, _ = saved_run
    run_dir = copy_run(source, tmp_path / "run")
    target = run_dir / "checkpoints/step00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    target.write_bytes(bytes(data))
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.dir={run_dir}"])
    messages = []
    assert select_resume_point(cfg, StepAgreement(1), 0, 1, messages.append).step == 4
    assert "does not match its checksum (corrupt)" in messages[0]
    size_only = load_config(REPO / "configs/tiny.yaml", [f"run.dir={run_dir}", "checkpoint.verify=size"])
    assert select_resume_point(size_only, StepAgreement(1), 0, 1, messages.append).step == 6


def test_an_explicit_checkpoint_that_is_damaged_is_an_error_not_a_substitute(saved_run, tmp_path):
    source, _ = saved_run
    run_dir = copy_run(source, tmp_path / "run")
    (run_dir / "checkpoints/step00000004/manifest.json").unlink()
    cfg = load_config(REPO / "configs/tiny.yaml", [f"checkpoint.resume={run_dir}/checkpoints/step00000004"])
    with pytest.raises(
        CheckpointError, match=r"step00000004 is not a complete checkpoint: it has no manifest\.json"
    ):
        select_resume_point(cfg, StepAgreement(1), 0, 1, print)


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(saved_run, tmp_path):
    source, uninterrupted = saved_run
    run_dir = copy_run(source, tmp_path / "run")
    damaged = run_dir / "checkpoints/step00000006/mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    records = run_distributed(train_and_read_metrics, 2, [*SAVE_EVERY_2, "train.steps=6"], str(run_dir))[0]
    steps = {r["step"]: r for r in step_records(records)}
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["resumed_from"]["step"] == 4
    for step in (5, 6):  # trained again from step 4: the same numbers
        assert steps[step]["loss"] == uninterrupted[step]["loss"]
    # metrics.jsonl reads as one run: the lost steps' records were replaced, not duplicated
    assert [r["step"] for r in step_records(records)] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints/step00000006/manifest.json").is_file()  # saved again, whole


POISON = 2 * BATCH  # the batch of step 3 (0-based global sample position)


def test_fail_policy_stops_at_the_bad_step_naming_its_samples(tmp_path):
    (rank0, _) = run_distributed(
        train_with_poisoned_batch, 2, ["train.steps=6", "train.on_nonfinite=fail"], str(tmp_path), POISON
    )
    assert rank0["error"]["step"] == 3
    message = rank0["error"]["message"]
    # The gradient norm is what the guard saw; it does not claim the loss was non-finite.
    assert re.match(r"the global gradient norm became (nan|inf) at step 3", message)
    assert "training loss" not in message
    assert f"the batch at sample position {POISON}" in message
    assert "train.on_nonfinite=skip|rollback" in message


def test_rollback_without_a_checkpoint_says_how_to_get_one_not_to_set_the_policy_in_force(tmp_path):
    policy = [
        "train.steps=6",
        "train.on_nonfinite=rollback",
        "checkpoint.interval=4",
    ]  # bad step 3 comes first
    (rank0,) = run_distributed(train_with_poisoned_batch, 1, policy, str(tmp_path), POISON)
    message = rank0["error"]["message"]
    assert "no complete checkpoint to roll back to" in message and "lower checkpoint.interval" in message
    assert "set train.on_nonfinite=skip|rollback" not in message


def corrupt_optimizer_state_in_place(folder):
    """NaN into every floating-point tensor of the optimizer files, the file sizes unchanged (as a
    flipped-bits disk would): torch.save stores tensor bytes verbatim and torch.load checks no CRC."""
    import numpy as np
    import torch

    for path in folder.glob("*optim_states.pt"):
        raw = bytearray(path.read_bytes())
        for data in _float_tensor_bytes(torch.load(path, weights_only=False)):
            at = raw.find(data)
            assert at >= 0
            raw[at : at + len(data)] = np.full(len(data) // 4, np.nan, np.float32).tobytes()
        path.write_bytes(bytes(raw))
    return folder


def _float_tensor_bytes(value):
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 16:
        yield value.contiguous().numpy().tobytes()
    elif isinstance(value, dict | list | tuple):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _float_tensor_bytes(item)


def test_a_non_finite_step_after_an_unverified_resume_names_the_unchecked_checkpoint(tmp_path):
    """checkpoint.verify=size trusts a checkpoint whose bytes changed in place; the step that then goes
    non-finite must point at the checkpoint, not only at the learning rate."""
    run_dir = tmp_path / "run"
    first = run_distributed(train_with_poisoned_batches, 1, ["train.steps=2", "checkpoint.save_final=true"],
                            str(run_dir), [])[0]  # fmt: skip
    assert first["error"] is None
    corrupt_optimizer_state_in_place(run_dir / "checkpoints/step00000002")
    again = run_distributed(train_with_poisoned_batches, 1, ["train.steps=4", "checkpoint.verify=size"],
                            str(run_dir), [])[0]  # fmt: skip
    message = again["error"]["message"]
    # Step 3 still trains on the model file's good weights; its update applies the NaN moments.
    assert again["error"]["step"] == 4
    assert f"resumed from {run_dir}/checkpoints/step00000002 with checkpoint.verify=size" in message
    assert "rerun with checkpoint.verify=checksum" in message


def test_skip_policy_logs_the_step_and_its_samples_and_trains_on(tmp_path):
    (rank0, _) = run_distributed(
        train_with_poisoned_batch, 2, ["train.steps=6", "train.on_nonfinite=skip"], str(tmp_path), POISON
    )
    assert rank0["error"] is None
    events = [r for r in rank0["records"] if r.get("event")]
    assert [(e["step"], e["event"], e["sample_position"]) for e in events] == [(3, "nonfinite_skip", POISON)]
    assert len(events[0]["sample_ids"]) == BATCH and all(len(i) == 2 for i in events[0]["sample_ids"])
    steps = {r["step"]: r for r in step_records(rank0["records"])}
    assert all(steps[s]["loss"] == steps[s]["loss"] for s in (4, 5, 6))  # finite again (NaN != NaN)
    assert steps[4]["lr"] == steps[3]["lr"]  # the skipped update did not advance the schedule either


def test_rollback_policy_reloads_the_last_checkpoint_and_skips_exactly_the_bad_batch(tmp_path):
    policy = [
        "train.steps=6",
        "train.on_nonfinite=rollback",
        "checkpoint.interval=2",
        "checkpoint.keep_last=0",
    ]
    bad = 4 * BATCH  # the batch of step 5: the run rolls back to step 4
    (rank0, _) = run_distributed(train_with_poisoned_batch, 2, policy, str(tmp_path / "rollback"), bad)
    assert rank0["error"] is None
    events = [r for r in rank0["records"] if r.get("event")]
    assert [(e["step"], e["event"], e["rolled_back_to"]) for e in events] == [(5, "nonfinite_rollback", 4)]
    # The reference never met the bad batch: it skipped it from the start. After the rollback the
    # run is at that reference's state of step 4, so steps 5 and 6 must be bitwise the same.
    reference = {
        r["step"]: r
        for r in step_records(run_distributed(train_skipping_batch, 2, policy, str(tmp_path / "ref"), bad)[0])
    }
    steps = {r["step"]: r for r in step_records(rank0["records"])}
    for step in (5, 6):
        assert steps[step]["loss"] == reference[step]["loss"], step
        assert steps[step]["grad_norm"] == reference[step]["grad_norm"], step


def test_two_bad_batches_after_one_checkpoint_are_both_skipped_and_both_events_kept(tmp_path):
    """Step 3's batch rolls the run back to step 2; then step 3 meets the next bad batch and rolls
    back to step 2 again. The first skip predates no checkpoint, so it must survive the second
    rollback (else the two bad batches alternate until max_nonfinite_events), and metrics.jsonl must
    keep the first rollback's event, which a rollback to step 2 would otherwise cut off."""
    policy = ["train.steps=5", "train.on_nonfinite=rollback", "checkpoint.interval=2", "checkpoint.keep_last=0",
              "checkpoint.save_final=true", "train.max_nonfinite_events=4"]  # fmt: skip
    run_dir = tmp_path / "run"
    first, second = 2 * BATCH, 3 * BATCH
    result = run_distributed(train_with_poisoned_batches, 1, policy, str(run_dir), [first, second])[0]
    assert result["error"] is None
    events = [
        (r["step"], r["sample_position"], r["rolled_back_to"]) for r in result["records"] if r.get("event")
    ]
    assert events == [(3, first, 2), (3, second, 2)]
    assert [r["step"] for r in step_records(result["records"])] == [1, 2, 3, 4, 5]
    state = json.loads((run_dir / "checkpoints/step00000005/state.json").read_text())
    assert state["parts"]["data.skipped_batches"] == {"positions": [first, second]}
    assert state["parts"]["data"]["consumed_samples"] == 7 * BATCH  # 5 steps trained, 2 batches skipped


def mounted_tmpfs(tmp_path, size):
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    return mount


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for the first checkpoint of the small model (~1.9 MiB, 2 ranks) and its run
    files, not for a second one beside it (a save needs 1.1 x the last one's size + 1 MiB free)."""
    import subprocess

    mount = mounted_tmpfs(tmp_path, "4M")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def disk_for_two(tmp_path):
    """A 6 MiB tmpfs: room for two checkpoints of the small model, not for a third beside them."""
    import subprocess

    mount = mounted_tmpfs(tmp_path, "6M")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_cured_by_a_lower_keep_last_on_the_rerun(disk_for_two):
    """keep_last=0 (keep all) fills the disk at the third save; the message says to lower keep_last,
    and the rerun with keep_last=1 removes the older checkpoint before saving, so it fits."""
    run_dir = str(disk_for_two / "run")
    full = run_distributed(train_until_checkpoint_error, 2, SAVE_EVERY_2, run_dir)[0]
    assert full["step"] == 6 and "lower checkpoint.keep_last" in full["error"]
    again = run_distributed(
        train_until_checkpoint_error, 2, [*SAVE_EVERY_2, "checkpoint.keep_last=1"], run_dir
    )
    assert again[0] == {"error": None, "step": 6}
    checkpoints = disk_for_two / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000006"]


def test_a_save_that_would_not_fit_stops_every_rank_and_keeps_the_last_checkpoint(small_disk):
    overrides = [*SAVE_EVERY_2, "checkpoint.keep_last=1", "logging.tensorboard=false", "logging.plot=false"]
    results = run_distributed(train_until_checkpoint_error, 2, overrides, str(small_disk / "run"))
    for result in results:  # both ranks, at the same step: the second save
        assert result["step"] == 4
        assert "not enough free disk space" in result["error"] and "Nothing was written" in result["error"]
        # keep_last=1 already: only the newest is left, and it may not go before its successor exists
        assert "lower checkpoint.keep_last cannot help" in result["error"]
    checkpoints = small_disk / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000002"]  # no partial left
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.dir={small_disk / 'run'}"])
    assert select_resume_point(cfg, StepAgreement(1), 0, 1, print).step == 2
