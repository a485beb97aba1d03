"""The checkpoint format's parts on their own: manifests, the commit, the catalogue, retention,
free-space checks, RNG capture, host snapshots, metrics truncation, resume drift checks."""

import json
import random
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from conftest import TINY
from pretrain.checkpoint import rng
from pretrain.checkpoint.files import CHECKSUM, HashingWriter, file_checksum, write_bytes_durably
from pretrain.checkpoint.manifest import (
    LATEST,
    FileEntry,
    Manifest,
    apply_retention,
    check_checksums,
    check_free_space,
    check_sizes,
    checkpoint_folders,
    commit,
    partial_name,
    read_latest,
    read_manifest,
    retention_victims,
    split_for_ranks,
)
from pretrain.checkpoint.resume import resume_changes
from pretrain.checkpoint.writer import HostBuffers, snapshot
from pretrain.config import ConfigError, load_config
from pretrain.errors import CheckpointError, InvalidCheckpoint
from pretrain.train.run_dir import truncate_metrics


def write_checkpoint(directory, step, files=None):
    """A committed checkpoint folder holding `files` (name -> bytes), as the writer leaves it."""
    files = files or {"model.pt": b"weights" * 100, "rng/rank_00000.safetensors": b"rng"}
    partial = directory / partial_name(step)
    entries = {}
    for name, data in files.items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        size, checksum = write_bytes_durably(partial / name, data)
        entries[name] = FileEntry(size, checksum)
    return commit(partial, Manifest(f"step{step:08d}", step, entries, world_size=1))


def test_commit_renames_the_partial_folder_writes_the_manifest_and_moves_latest(tmp_path):
    final = write_checkpoint(tmp_path, 7)
    assert final.name == "step00000007" and not (tmp_path / partial_name(7)).exists()
    assert read_latest(tmp_path) == "step00000007"  # DeepSpeed's pointer format: the tag
    manifest = read_manifest(final)
    assert manifest.checksum == CHECKSUM and manifest.step == 7
    assert manifest.files["model.pt"].size == 700
    check_sizes(final, manifest)
    check_checksums(final, manifest, manifest.files)
    write_checkpoint(tmp_path, 9)
    assert read_latest(tmp_path) == "step00000009"
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step00000009", "step00000007"]


def test_a_folder_without_a_manifest_is_not_a_checkpoint(tmp_path):
    folder = tmp_path / "step00000003"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"x")
    with pytest.raises(InvalidCheckpoint, match=r"no manifest\.json"):
        read_manifest(folder)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damage_to_any_file_is_found_and_named(tmp_path, damage):
    final = write_checkpoint(tmp_path, 5)
    target = final / "model.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (final / "manifest.json").write_text('{"format": "pretrain-checkpoint-v1", "files": ')
    with pytest.raises(InvalidCheckpoint) as error:
        manifest = read_manifest(final)
        check_sizes(final, manifest)
        check_checksums(final, manifest, manifest.files)
    expected = {"truncate": "model.pt has 699 bytes", "flip": "model.pt does not match its checksum",
                "delete": "model.pt is missing", "manifest": "manifest.json is unreadable"}[damage]  # fmt: skip
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[]", "holds a list, not an object"),
        ("null", "holds a NoneType"),
        ('"step00000005"', "holds a str"),
        ('{"format": "pretrain-checkpoint-v1", "files": []}', "malformed"),
        (
            '{"format": "pretrain-checkpoint-v1", "tag": "step00000005", "step": "5", "files": {}}',
            "'step' is '5'",
        ),
        ("OK", "files"),  # a valid manifest with one entry broken: see below
    ],
)
def test_a_manifest_of_the_wrong_shape_means_not_complete(tmp_path, text, expected):
    """Valid JSON that is not a manifest is found by the schema check, never an AttributeError."""
    final = write_checkpoint(tmp_path, 5)
    if text == "OK":
        document = json.loads((final / "manifest.json").read_text())
        document["files"]["model.pt"] = {"size": -1, "checksum": "x"}
        text, expected = json.dumps(document), "the entry of 'model.pt'"
    (final / "manifest.json").write_text(text)
    with pytest.raises(InvalidCheckpoint, match=r"manifest\.json") as error:
        read_manifest(final)
    assert expected in str(error.value)


def test_a_manifest_naming_files_outside_its_folder_is_refused(tmp_path):
    final = write_checkpoint(tmp_path, 5)
    document = json.loads((final / "manifest.json").read_text())
    document["files"]["../../etc/passwd"] = {"size": 1, "checksum": "x"}
    (final / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(InvalidCheckpoint, match="outside the checkpoint folder"):
        read_manifest(final)


def test_a_new_save_of_a_step_whose_folder_is_damaged_keeps_the_damaged_one_aside(tmp_path):
    final = write_checkpoint(tmp_path, 4, {"model.pt": b"old" * 10})
    (final / "model.pt").write_bytes(b"x")  # damaged: the manifest says 30 bytes
    (final / "manifest.json").write_text("[]")
    write_checkpoint(tmp_path, 4, {"model.pt": b"new" * 10})
    assert (tmp_path / "step00000004" / "model.pt").read_bytes() == b"new" * 10
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("step00000004.damaged-")]
    assert (aside / "model.pt").read_bytes() == b"x"
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step00000004"]  # never taken for a checkpoint
    write_checkpoint(tmp_path, 4, {"model.pt": b"newer"})  # a complete one is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == [
        "step00000004",
        aside.name,
    ]


def test_hashing_writer_checksums_the_bytes_it_writes(tmp_path):
    writer = HashingWriter(tmp_path / "f")
    torch.save({"w": torch.arange(1000.0)}, writer)  # torch.save streams into any writable object
    checksum = writer.close()
    assert checksum == file_checksum(tmp_path / "f") and writer.size == (tmp_path / "f").stat().st_size
    assert torch.equal(torch.load(tmp_path / "f")["w"], torch.arange(1000.0))


def test_recommitting_a_step_replaces_the_old_folder_whole(tmp_path):
    write_checkpoint(tmp_path, 4, {"a.pt": b"old"})
    write_checkpoint(tmp_path, 4, {"b.pt": b"new"})
    assert sorted(p.name for p in (tmp_path / "step00000004").iterdir()) == ["b.pt", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("steps", "keep_last", "keep_every", "deleted"),
    [
        ([100, 200, 300, 400], 2, 0, [200, 100]),
        ([100, 200, 300, 400], 2, 200, [100]),  # 200 is permanent
        ([100, 200, 300], 0, 0, []),  # 0 keeps everything
        ([100], 1, 0, []),
        ([500, 100, 300], 1, 0, [300, 100]),  # order of discovery does not matter
    ],
)
def test_retention_keeps_the_newest_and_the_permanent_ones(steps, keep_last, keep_every, deleted):
    assert retention_victims(steps, keep_last, keep_every) == deleted


def test_retention_never_counts_or_deletes_incomplete_folders_and_clears_stale_partials(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step)
    broken = tmp_path / "step00000004"  # newest by name, but not complete
    broken.mkdir()
    stale = tmp_path / partial_name(5)
    stale.mkdir()
    removed = apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert sorted(p.name for p in removed) == [partial_name(5), "step00000001", "step00000002"]
    assert (tmp_path / "step00000003" / "manifest.json").is_file()  # the newest complete one stays
    assert broken.is_dir()


def test_not_enough_free_space_is_an_error_before_anything_is_written(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CheckpointError, match=r"not enough free disk space .* Nothing was written"):
        check_free_space(tmp_path, free * 2, keep_last=1)
    check_free_space(tmp_path, 1, keep_last=1)
    assert list(tmp_path.iterdir()) == []


def test_files_are_dealt_to_verifying_ranks_by_size():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10}
    manifest = Manifest("t", 1, {n: FileEntry(s, "") for n, s in sizes.items()}, world_size=2)
    shares = split_for_ranks(manifest, 2)
    assert sorted(n for share in shares for n in share) == ["a", "b", "c", "d"]
    assert shares == [["a", "d"], ["b", "c"]]  # 110 and 110 bytes


def test_rng_states_come_back_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    data = rng.capture()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    from safetensors import safe_open

    path = tmp_path / "rng.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    rng.restore(data, metadata)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_snapshot_copies_tensors_and_keeps_the_structure():
    state = OrderedDict(w=torch.ones(3), shape=torch.Size([2, 3]), nested={"t": (torch.zeros(2), 5)})
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    copy = snapshot(state)
    state["w"].add_(1)
    assert torch.equal(copy["w"], torch.ones(3))  # a copy, not a view of the live tensor
    assert type(copy) is OrderedDict and copy._metadata == {"": {"version": 1}}
    assert type(copy["shape"]) is torch.Size  # DeepSpeed's param_shapes must stay torch.Size
    assert isinstance(copy["nested"]["t"], tuple) and copy["nested"]["t"][1] == 5


def test_host_buffers_of_a_written_save_take_the_next_save_copies():
    """The second save copies into the first one's memory (no allocation on the training thread's
    time), and the copy holds the new values."""
    buffers = HostBuffers()
    state = {"w": torch.arange(6.0).view(2, 3)}
    first = buffers.snapshot(state)
    buffers.release(first)
    assert buffers.bytes_held() == {"pinned": 0, "pageable": 24}
    state["w"] += 1
    second = buffers.snapshot(state)
    assert second["w"].data_ptr() == first["w"].data_ptr()
    assert torch.equal(second["w"], torch.arange(1.0, 7.0).view(2, 3))
    assert buffers.bytes_held() == {"pinned": 0, "pageable": 0}


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines) + "\n")
    assert truncate_metrics(path, 2) == 3  # steps 3 and 4, and the line cut short by a kill
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_resume_refuses_changes_to_the_data_and_names_the_fix():
    saved = load_config(TINY)
    data = {"datasets": ["a"], "tokenizer_hash": "x", "fingerprints": ["1"]}
    problems, notes = resume_changes(
        saved, load_config(TINY, ["optim.lr=1e-4", "train.steps=400"]), data, data
    )
    assert problems == [] and notes == ["optim.lr: 0.002 -> 0.0001", "train.steps: 200 -> 400"]

    changed = load_config(TINY, ["train.global_batch_size=32", "seed=7"])
    problems, _ = resume_changes(saved, changed, data, {**data, "fingerprints": ["2"]})
    assert len(problems) == 3
    batch = next(p for p in problems if p.startswith("train.global_batch_size"))
    assert "was 16 in the checkpoint and is 32 now" in batch
    assert "checkpoint.allow_changes='[train.global_batch_size]'" in batch
    assert any(p.startswith("seed was 1234") for p in problems)
    assert "the training data changed since the checkpoint" in problems[2]

    allowed = load_config(
        TINY, ["train.global_batch_size=32", "checkpoint.allow_changes=[train.global_batch_size]"]
    )
    assert resume_changes(saved, allowed, data, data)[0] == []

    problems, _ = resume_changes(saved, load_config(TINY, ["model.hidden_size=64"]), data, data)
    assert problems and "model.hidden_size" in problems[0] and "a resumed run keeps its model" in problems[0]


def test_checkpoint_settings_are_validated():
    with pytest.raises(ConfigError) as error:
        load_config(
            TINY,
            ["checkpoint.keep_last=-1", "checkpoint.verify=md5", "checkpoint.allow_changes=[model.hidden_size]",
             "train.on_nonfinite=retry", "checkpoint.resume="],
        )  # fmt: skip
    text = str(error.value)
    for expected in ("checkpoint.keep_last must be >= 0", "checkpoint.verify must be one of checksum, size",
                     "model settings can never change on resume", "train.on_nonfinite must be one of fail, skip, rollback",
                     "checkpoint.resume: expected a string"):  # fmt: skip
        assert expected in text
    with pytest.raises(ConfigError, match="rollback needs periodic checkpoints"):
        load_config(TINY, ["train.on_nonfinite=rollback", "checkpoint.interval=0"])


def test_latest_pointer_is_replaced_atomically(tmp_path):
    write_checkpoint(tmp_path, 1)
    assert (tmp_path / LATEST).read_text() == "step00000001"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_write_that_fails_is_reported_and_commits_nothing(tmp_path):
    from pretrain.checkpoint.writer import BackgroundWriter

    write_checkpoint(tmp_path, 1)
    writer = BackgroundWriter(rank=0, world_size=1, keep_last=0, keep_every=0)
    partial = tmp_path / partial_name(2)
    partial.mkdir()
    (partial / "blocker").write_text("")  # a file where the writer needs a folder: the write fails
    writer.begin(2, partial)
    writer.submit_state(partial / "fine.pt", {"w": torch.ones(2)})
    writer.submit_bytes(partial / "blocker" / "rng.safetensors", b"rng")
    writer.finish()
    outcome = writer.wait(timeout=60)
    assert outcome is not None and not outcome.ok
    assert "rank 0 could not write" in outcome.message and "rng.safetensors" in outcome.message
    assert not (tmp_path / "step00000002").exists() and read_latest(tmp_path) == "step00000001"

    writer.begin(3, tmp_path / partial_name(3))  # the next save is unaffected
    writer.submit_state(tmp_path / partial_name(3) / "fine.pt", {"w": torch.ones(2)})
    writer.finish()
    assert writer.wait(timeout=60).ok and read_latest(tmp_path) == "step00000003"
    writer.close()
