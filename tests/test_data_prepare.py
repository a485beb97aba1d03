"""text -> tokenizer -> prepare -> shards -> loader, and the mistakes users make on the way."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from pretrain.data.indexed import IndexedDataset, ShardError
from pretrain.data.manifest import load_manifest, verify
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer
from pretrain.errors import DataError

TEXTS = [f"def function_{i}(x):\n    return x * {i}  # doc {i}\n" * (1 + i % 5) for i in range(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for part, chunk in enumerate((TEXTS[:70], TEXTS[70:])):
        with (root / f"part{part}.jsonl").open("w") as f:
            for text in chunk:
                f.write(json.dumps({"text": text, "id": part}) + "\n")
    tokenizer = train_tokenizer(TEXTS, 400, root / "tok")
    return root, tokenizer


def documents(folder, tokenizer):
    manifest = load_manifest(folder)
    out = []
    for shard in manifest.shards:
        data = IndexedDataset(folder / shard.prefix)
        out += [tokenizer.decode(data.document(i).tolist()) for i in range(data.num_documents)]
    return out


def test_prepared_shards_give_back_every_document_with_an_end_of_document(corpus, tmp_path):
    root, tokenizer = corpus
    manifest = prepare([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "d", shard_tokens=2_000)
    assert manifest is not None and len(manifest.shards) > 2  # several bounded shards
    assert manifest.num_documents == len(TEXTS)
    assert documents(tmp_path / "d", tokenizer) == [t + "<|eos|>" for t in TEXTS]
    assert manifest.tokenizer_hash == tokenizer.content_hash and manifest.dtype == "uint16"
    assert verify(tmp_path / "d").num_tokens == manifest.num_tokens


def test_two_workers_write_the_same_bytes_as_one(corpus, tmp_path):
    root, _ = corpus
    one = prepare([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "one", workers=1, shard_tokens=2_000)
    two = prepare([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "two", workers=2, shard_tokens=2_000)
    assert [s.bin_sha256 for s in one.shards] == [s.bin_sha256 for s in two.shards]


def test_array_job_parts_hold_the_same_documents_as_one_run(corpus, tmp_path):
    root, tokenizer = corpus
    inputs = [str(root / "*.jsonl")]
    assert (
        prepare(inputs, str(root / "tok"), tmp_path / "a", shard_index=1, num_shards=2) is None
    )  # waits for part 0
    assert not (tmp_path / "a" / "manifest.json").exists()
    manifest = prepare(inputs, str(root / "tok"), tmp_path / "a", shard_index=0, num_shards=2)
    assert manifest is not None and manifest.source["num_parts"] == 2
    assert documents(tmp_path / "a", tokenizer) == [
        t + "<|eos|>" for t in TEXTS
    ]  # part 0 = part0.jsonl first


def test_interrupted_prepare_resumes_without_redoing_finished_shards(corpus, tmp_path):
    root, _ = corpus
    args = ([str(root / "*.jsonl")], str(root / "tok"))
    complete = prepare(*args, tmp_path / "ref", shard_tokens=2_000)
    prepare(*args, tmp_path / "d", shard_tokens=2_000)
    part = tmp_path / "d" / "part-00000"
    # Simulate a crash while the third shard was being written: its record never appeared, the
    # manifest and done marker neither, and a temporary file was left behind.
    (part / "shard-00002.json").unlink()
    for later in sorted(part.glob("shard-0000[3-9].*")):
        later.unlink()
    (part / "done.json").unlink()
    (tmp_path / "d" / "manifest.json").unlink()
    (part / "shard-00002.bin.tmp").write_bytes(b"half")
    kept = {p.name: p.stat().st_mtime_ns for p in part.glob("shard-0000[01].*")}
    resumed = prepare(*args, tmp_path / "d", shard_tokens=2_000)
    assert {p.name: p.stat().st_mtime_ns for p in part.glob("shard-0000[01].*")} == kept  # not rewritten
    assert [s.bin_sha256 for s in resumed.shards] == [s.bin_sha256 for s in complete.shards]
    assert not list(part.glob("*.tmp"))


def test_missing_text_field_lists_the_fields_present(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match=r"has no field 'content' \(fields: text, id\); pass --text-field"):
        prepare([str(root / "part0.jsonl")], str(root / "tok"), tmp_path / "d", text_field="content")
    # Nothing was finished, so the corrected command just runs (no "other settings" refusal).
    assert prepare([str(root / "part0.jsonl")], str(root / "tok"), tmp_path / "d").num_documents == 70


def test_empty_input_and_unmatched_globs_are_errors(corpus, tmp_path):
    root, _ = corpus
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no documents"):
        prepare([str(tmp_path / "empty.jsonl")], str(root / "tok"), tmp_path / "d")
    with pytest.raises(DataError, match="matches no file"):
        prepare([str(tmp_path / "nothing-*.jsonl")], str(root / "tok"), tmp_path / "d")


def test_tokenizer_without_end_of_document_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="has no end-of-document token"):
        load_tokenizer(tmp_path)


def test_trained_tokenizer_folder_loads_in_transformers(corpus):
    transformers = pytest.importorskip("transformers")
    root, tokenizer = corpus
    hf = transformers.AutoTokenizer.from_pretrained(root / "tok")
    assert hf(TEXTS[3], add_special_tokens=False)["input_ids"] == tokenizer.encode_batch([TEXTS[3]])[0]
    assert hf.eos_token_id == tokenizer.eod_id


def test_checksum_mismatch_names_the_shard(corpus, tmp_path):
    root, _ = corpus
    manifest = prepare([str(root / "part0.jsonl")], str(root / "tok"), tmp_path / "d")
    bin_path = tmp_path / "d" / f"{manifest.shards[0].prefix}.bin"
    data = bytearray(bin_path.read_bytes())
    data[10] ^= 0xFF  # same size, different content: only the checksum can tell
    bin_path.write_bytes(bytes(data))
    verify(tmp_path / "d", checksums=False)
    with pytest.raises(ShardError, match=r"shard-00000\.bin does not match the sha256"):
        verify(tmp_path / "d")


def run_cli(*args):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_commands_and_a_vocabulary_that_does_not_fit_the_model(corpus, tmp_path):
    root, tokenizer = corpus
    result = run_cli("-m", "pretrain.data", "prepare", "--input", str(root / "*.jsonl"), "--tokenizer",
                     str(root / "tok"), "--output", str(tmp_path / "d"), "--workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "docs/s" in result.stderr and "tokens/s" in result.stderr
    inspected = run_cli("-m", "pretrain.data", "inspect", str(tmp_path / "d"))
    assert inspected.returncode == 0, inspected.stderr
    manifest = load_manifest(tmp_path / "d")
    assert f"{manifest.num_tokens:,} tokens in {len(TEXTS)} documents" in inspected.stdout
    assert "checksums: all match the manifest" in inspected.stdout and "def function_0" in inspected.stdout
    missing = run_cli("-m", "pretrain.data", "inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 4 and "manifest.json does not exist" in missing.stderr  # a DataError
    small = run_cli("pretrain/main.py", "--config", str(TINY), f"data.paths=[{tmp_path / 'd'}]",
                    "model.vocab_size=300", f"run.dir={tmp_path / 'run'}")  # fmt: skip
    assert small.returncode == 2
    assert f"set model.vocab_size >= {tokenizer.vocab_size}" in small.stderr


@pytest.mark.slow
def test_two_ranks_train_on_a_blend_of_prepared_datasets(corpus, tmp_path):
    from pretrain.testing import run_distributed
    from training_runs import step_records, train_and_read_metrics

    root, tokenizer = corpus
    for name in ("code", "more"):
        prepare([str(root / f"part{int(name == 'more')}.jsonl")], str(root / "tok"), tmp_path / name)
    overrides = [f"data.paths=[{tmp_path / 'code'},{tmp_path / 'more'}]", "data.weights=[0.75,0.25]",
                 f"model.vocab_size={tokenizer.vocab_size}", "train.seq_len=32", "data.verify_checksums=true"]  # fmt: skip
    records, _ = run_distributed(train_and_read_metrics, 2, overrides, str(tmp_path / "run"))
    records = step_records(records)
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    shares = records[-1]["data_share"]
    assert set(shares) == {"code", "more"} and shares["code"] == pytest.approx(0.75, abs=0.05)


def test_loader_samples_over_shards_read_back_the_documents_in_order(corpus, tmp_path):
    from pretrain.config import DataConfig
    from pretrain.data.shards import open_dataset

    root, tokenizer = corpus
    prepare([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "d", shard_tokens=1_500)
    opened = open_dataset(str(tmp_path / "d"), DataConfig(validation_fraction=0.0), seq_len=50)
    samples = opened.train
    tokens = [*samples[0].tolist()] + [t for i in range(1, len(samples)) for t in samples[i][1:].tolist()]
    text = tokenizer.decode(tokens)  # packed samples overlap by one token and cross shard boundaries
    expected = "".join(t + "<|eos|>" for t in TEXTS)
    assert (
        len(tokens) == 1 + 50 * len(samples) and expected.startswith(text) and len(text) > 0.9 * len(expected)
    )


def test_one_file_over_two_array_jobs_splits_by_document_position(corpus, tmp_path):
    root, tokenizer = corpus
    inputs, tok = [str(root / "part0.jsonl")], str(root / "tok")
    assert prepare(inputs, tok, tmp_path / "a", shard_index=0, num_shards=2, shard_tokens=500) is None
    manifest = prepare(inputs, tok, tmp_path / "a", shard_index=1, num_shards=2, shard_tokens=500)
    assert manifest is not None and manifest.source["split"] == "documents"
    expected = [t + "<|eos|>" for t in TEXTS[:70]]
    assert documents(tmp_path / "a", tokenizer) == expected[0::2] + expected[1::2]  # part 0, then part 1
    assert {s.prefix.split("/")[0] for s in manifest.shards} == {"part-00000", "part-00001"}
    assert verify(tmp_path / "a").num_documents == 70


def test_a_finished_shard_without_its_idx_is_rewritten_and_earlier_shards_are_kept(corpus, tmp_path):
    root, _ = corpus
    args = ([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "d")
    complete = prepare(*args, shard_tokens=2_000)
    part = tmp_path / "d" / "part-00000"
    last = len(complete.shards) - 1
    (part / f"shard-{last:05d}.idx").unlink()  # as if the crash came between the .bin and .idx renames
    (part / "done.json").unlink()
    kept = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in part.glob("shard-*")
        if f"{last:05d}" not in p.name
    }
    resumed = prepare(*args, shard_tokens=2_000)
    after = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in part.glob("shard-*")
        if f"{last:05d}" not in p.name
    }
    assert after == kept
    assert [s.bin_sha256 for s in resumed.shards] == [s.bin_sha256 for s in complete.shards]
    again = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    prepare(*args, shard_tokens=2_000)  # complete: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in part.iterdir()} == again


def test_resuming_with_other_settings_is_refused(corpus, tmp_path):
    root, _ = corpus
    args = ([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "d")
    prepare(*args, shard_tokens=2_000)
    with pytest.raises(
        DataError,
        match=r"part-00000 was started with other settings .*shard_tokens: 2000 -> 3000.*new --output",
    ):
        prepare(*args, shard_tokens=3_000)


def test_merge_names_the_parts_that_are_missing(corpus, tmp_path):
    from pretrain.data.__main__ import main
    from pretrain.data.prepare import merge

    root, _ = corpus
    prepare([str(root / "*.jsonl")], str(root / "tok"), tmp_path / "d", shard_index=1, num_shards=3)
    with pytest.raises(
        DataError, match=r"parts \[0, 2\] of 3 are not complete; .*--shard-index I --num-shards 3"
    ):
        merge(tmp_path / "d")
    with pytest.raises(DataError, match=r"manifest.json does not exist \(parts finished: \['part-00001'\]"):
        load_manifest(tmp_path / "d")
    assert main(["merge", str(tmp_path / "d")]) == 4


def test_a_foreign_tokenizer_folder_names_its_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(
        models.WordLevel({"<unk>": 0, "</s>": 1, "<|endoftext|>": 2, "a": 3}, unk_token="<unk>")
    )
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").eod_id == 2  # guessed from common names
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.eod_id, tokenizer.bos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, None, None, 4)
    assert tokenizer.encode_batch(["a b"]) == [[3, 0]]
    with pytest.raises(DataError, match=r"no tokenizer at .*train one with"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(DataError, match="--vocab-size 100 is too small"):
        train_tokenizer(["x"], 100, tmp_path / "small")


def test_unreadable_records_are_named(corpus, tmp_path):
    root, _ = corpus
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot read record 0 onwards .* valid json"):
        prepare([str(tmp_path / "bad.jsonl")], str(root / "tok"), tmp_path / "d")
    (tmp_path / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"null\.jsonl: record 1 has 'text' = NoneType, not text"):
        prepare([str(tmp_path / "null.jsonl")], str(root / "tok"), tmp_path / "e")


def test_export_stdlib_writes_the_builtin_corpus_as_json_lines(tmp_path):
    from pretrain.data.__main__ import main
    from pretrain.data.builtin import stdlib_documents

    assert main(["export-stdlib", "--output", str(tmp_path / "stdlib.jsonl")]) == 0
    lines = (tmp_path / "stdlib.jsonl").read_text().splitlines()
    paths = stdlib_documents()
    assert len(lines) == len(paths)
    first = json.loads(lines[0])
    assert first["text"] == paths[0].read_text(errors="replace") and first["path"].endswith(paths[0].name)


def test_a_prepare_killed_mid_run_resumes_to_the_same_bytes(corpus, tmp_path):
    import signal
    import time

    root, _ = corpus
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for copy in range(100):
            f.writelines(json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n" for text in TEXTS)
    tok, out = str(root / "tok"), tmp_path / "d"
    command = [sys.executable, "-m", "pretrain.data", "prepare", "--input", str(big), "--tokenizer", tok,
               "--output", str(out), "--workers", "2", "--shard-tokens", "5000"]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "part-00000" / "shard-00002.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job, workers included, as SLURM does on timeout
    job.wait()
    assert not (out / "manifest.json").exists()  # killed before the end
    resumed = prepare([str(big)], tok, out, workers=2, shard_tokens=5_000)
    reference = prepare([str(big)], tok, tmp_path / "ref", shard_tokens=5_000)
    assert [s.bin_sha256 for s in resumed.shards] == [s.bin_sha256 for s in reference.shards]
    assert verify(out).num_documents == 100 * len(TEXTS) and len(reference.shards) > 10
