"""Input that changed is prepared again."""

import json
import os

import pytest

from pretrain.data.indexed import IndexedDataset
from pretrain.data.manifest import load_manifest
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer
from pretrain.errors import DataError

TEXTS = [f"def alpha_{i}(x):\n    return x + {i}  # note {i}\n" * (1 + i % 4) for i in range(80)]
VOCAB = 400


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
