"""Input that changed is prepared again; corrupt or mismatched data is named (exit 4), never trained
into a crash."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY
from pretrain.config import DataConfig
from pretrain.data import DistributedBatches, load_training_data
from pretrain.data.indexed import IndexedDataset
from pretrain.data.manifest import load_manifest
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer
from pretrain.errors import DataError, ExitCode

TEXTS = [f"def alpha_{i}(x):\n    return x + {i}  # note {i}\n" * (1 + i % 4) for i in range(80)]
VOCAB = 400  # even: flipping the lowest bit of an id below it gives another id below it


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    assert train_tokenizer(TEXTS, VOCAB, folder).vocab_size == VOCAB
    return folder


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def documents(folder):
    manifest = load_manifest(folder)
    tokenizer = load_tokenizer(manifest.source["tokenizer"])
    out = []
    for shard in manifest.shards:
        data = IndexedDataset(folder / shard.prefix)
        out += [tokenizer.decode(data.document(i).tolist()) for i in range(data.num_documents)]
    return out


def test_an_input_edited_to_the_same_size_is_prepared_again_and_a_touched_one_is_not(
    tokenizer_dir, tmp_path, capsys
):
    source, out = tmp_path / "in.jsonl", tmp_path / "d"
    write_jsonl(source, TEXTS)
    prepare([str(source)], str(tokenizer_dir), out)
    raw = source.read_bytes()
    edited = raw.replace(b"alpha_7(", b"omega_7(")
    assert len(edited) == len(raw) and edited != raw
    source.write_bytes(edited)
    capsys.readouterr()
    prepare([str(source)], str(tokenizer_dir), out)
    assert "in.jsonl changed since it was prepared; preparing this part again" in capsys.readouterr().err
    assert documents(out) == [t.replace("alpha_7(", "omega_7(") + "<|eos|>" for t in TEXTS]

    # The same bytes with a new mtime (a `touch`, a copy) are the same input: nothing is redone.
    written = {p.name: p.stat().st_mtime_ns for p in (out / "part-00000").iterdir()}
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 60 * 10**9))
    prepare([str(source)], str(tokenizer_dir), out)
    assert "already complete" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "part-00000").iterdir()} == written


def test_a_part_recorded_by_an_earlier_version_is_not_taken_as_complete(tokenizer_dir, tmp_path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "d"
    write_jsonl(source, TEXTS)
    prepare([str(source)], str(tokenizer_dir), out)
    part = out / "part-00000" / "part.json"
    spec = json.loads(part.read_text())
    del spec["file_hashes"]
    spec["file_sizes"] = {str(source): source.stat().st_size}  # what earlier versions recorded
    part.write_text(json.dumps(spec))
    capsys.readouterr()
    manifest = prepare([str(source)], str(tokenizer_dir), out)
    assert (
        "from an earlier version that recorded the input's sizes, not its content" in capsys.readouterr().err
    )
    assert manifest is not None and documents(out) == [t + "<|eos|>" for t in TEXTS]
    assert "file_hashes" in json.loads(part.read_text())


def test_array_jobs_that_read_two_versions_of_one_input_are_not_merged(tokenizer_dir, tmp_path):
    source, out, tok = tmp_path / "in.jsonl", tmp_path / "d", str(tokenizer_dir)
    write_jsonl(source, TEXTS)
    assert prepare([str(source)], tok, out, shard_index=0, num_shards=2) is None
    new = [t.replace("alpha", "omega") for t in TEXTS]
    write_jsonl(source, new)  # edited before the second job ran
    with pytest.raises(DataError, match=r"parts 0 and 1 of .* different content of .*in\.jsonl"):
        prepare([str(source)], tok, out, shard_index=1, num_shards=2)
    manifest = prepare([str(source)], tok, out, shard_index=0, num_shards=2)  # part 0 starts over
    assert manifest is not None
    expected = [t + "<|eos|>" for t in new]
    assert documents(out) == expected[0::2] + expected[1::2]


@pytest.fixture(scope="module")
def prepared(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_jsonl(root / "in.jsonl", TEXTS)
    prepare([str(root / "in.jsonl")], str(tokenizer_dir), root / "d")
    return root / "d"


def damaged_copy(prepared, tmp_path, document, offset, change):
    """A copy of the dataset with token `offset` of `document` replaced by change(token); returns the
    copy and the old token."""
    folder = tmp_path / "d"
    shutil.copytree(prepared, folder)
    shard = IndexedDataset(folder / "part-00000" / "shard-00000")
    tokens = np.memmap(shard.bin_path, dtype=shard.dtype, mode="r+")
    position = int(shard.pointers[document]) // shard.dtype.itemsize + offset
    old = int(tokens[position])
    tokens[position] = change(old)
    tokens.flush()
    del tokens
    return folder, old


def epoch(data, prefetch=True):
    """Every training sample once, through the loader as training builds it; the tokens read."""
    samples = data.train[0]
    loader = DistributedBatches(data.train, 0, 8, 4, 0, 1, prefetch=prefetch, vocab_size=data.vocab_size)
    read = []
    for _ in range(len(samples) // 8 + 1):
        read += [t for inputs, labels in loader.next_step() for t in (inputs, labels)]
    return read


def test_a_token_id_past_the_vocabulary_is_named_by_shard_document_and_offset(prepared, tmp_path):
    folder, _ = damaged_copy(prepared, tmp_path, document=5, offset=3, change=lambda _: 60_000)
    data = load_training_data(DataConfig(paths=[str(folder)], validation_fraction=0.0), seq_len=16)
    assert data.vocab_size == VOCAB
    with pytest.raises(DataError) as error:  # read ahead on the prefetch thread, raised here
        epoch(data)
    message = str(error.value)
    assert (
        f"token id 60000 at {folder}/part-00000/shard-00000.bin, document 5, token 3 is outside the "
        f"vocabulary of the data's tokenizer (ids 0 to {VOCAB - 1})"
    ) in message
    assert "pretrain.data inspect" in message and "data.verify_checksums=true" in message


def test_a_flipped_bit_within_the_vocabulary_is_found_only_by_the_checksums(prepared, tmp_path):
    folder, old = damaged_copy(prepared, tmp_path, document=5, offset=3, change=lambda t: t ^ 1)
    data = load_training_data(DataConfig(paths=[str(folder)], validation_fraction=0.0), seq_len=16)
    read = epoch(data)  # every id is still a valid one: nothing can tell it from real data
    assert any(((t == (old ^ 1)).any()) for t in read)
    with pytest.raises(DataError, match=r"shard-00000\.bin does not match the sha256.*delete that shard's"):
        load_training_data(DataConfig(paths=[str(folder)], verify_checksums=True), seq_len=16)
    # The fix the message gives: a plain re-run would find the part complete (sizes and records intact).
    for path in (folder / "part-00000").glob("shard-00000.*"):
        path.unlink()
    source = load_manifest(folder).source
    prepare(source["inputs"], source["tokenizer"], folder)
    load_training_data(DataConfig(paths=[str(folder)], verify_checksums=True), seq_len=16)


def test_a_manifest_whose_vocabulary_is_not_its_tokenizers_is_refused(prepared, tmp_path, capsys):
    from pretrain.data.__main__ import main

    folder = tmp_path / "d"
    shutil.copytree(prepared, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**raw, "vocab_size": VOCAB + 100}))
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == ExitCode.DATA
    expected = f"manifest.json records vocab_size {VOCAB + 100}, but the tokenizer it was prepared with"
    err = capsys.readouterr().err
    assert expected in err and f"has vocab_size {VOCAB}" in err and "pretrain.data merge" in err
    with pytest.raises(DataError, match=expected):
        load_training_data(DataConfig(paths=[str(folder)]), seq_len=16)


def test_training_on_an_id_past_the_vocabulary_exits_4_naming_it(prepared, tmp_path):
    folder, _ = damaged_copy(prepared, tmp_path, document=0, offset=3, change=lambda _: 60_000)
    small = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
             "model.ffn_hidden_size=128", "train.seq_len=32", "train.global_batch_size=8",
             "train.micro_batch_size=4", "train.eval_interval=0", "logging.tensorboard=false",
             "logging.plot=false", "checkpoint.interval=0", "checkpoint.save_final=false"]  # fmt: skip
    steps = len(load_training_data(DataConfig(paths=[str(folder)]), 32).train[0]) // 8 + 1  # an epoch
    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), *small,
         f"data.paths=[{folder}]", f"model.vocab_size={VOCAB}", f"train.steps={steps}",
         f"run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    assert result.returncode == ExitCode.DATA, result.stderr[-3000:]
    assert f"error (rank 0): token id 60000 at {folder}/part-00000/shard-00000.bin, document 0, token 3" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
