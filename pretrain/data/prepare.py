"""Raw text -> tokenized Megatron-format shards + manifest, in parallel, resumable, memory-bounded.

Layout of OUTPUT (one part per array job; a single run is part 0 of 1):

    OUTPUT/part-00000/shard-00000.{bin,idx,json}   shards of at most `shard_tokens` tokens
    OUTPUT/part-00000/done.json                    written when the part is complete
    OUTPUT/manifest.json                           written once every part is complete

A shard counts only once its `.json` record exists (written after the .bin and .idx are fsynced and
renamed), so an interrupted run leaves no shard that looks complete. A re-run skips the documents of
the finished shards (reading, not tokenizing them) and continues; shard boundaries depend only on
the input and the tokenizer, so the result equals that of an uninterrupted run.
Array jobs split the input files: job i of n takes the sorted files i, i + n, i + 2n, ...
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import pretrain
from pretrain.data.errors import DataError
from pretrain.data.indexed import IndexedDatasetWriter, best_dtype
from pretrain.data.manifest import Manifest, ShardRecord, sha256_file, write_json_atomically
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

BATCH_DOCUMENTS = 512
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Local files matching the patterns (sorted), or the names themselves for hub datasets."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if matches:
            files += matches
        elif Path(pattern).suffix in _BUILDERS or "*" in pattern or Path(pattern).exists():
            raise DataError(f"--input {pattern!r} matches no file")
        else:
            files.append(pattern)  # a hub dataset name, read with streaming=True
    return files


def read_documents(source: str, text_field: str) -> Iterator[str]:
    """Documents of one file (or hub dataset) through `datasets`, streamed: memory stays bounded."""
    from datasets import load_dataset

    builder = _BUILDERS.get(Path(source).suffix.lower())
    if builder and Path(source).stat().st_size == 0:
        return  # `datasets` fails on an empty file instead of yielding nothing
    if builder:
        stream = load_dataset(builder, data_files=[source], split="train", streaming=True)
    else:
        stream = load_dataset(source, split="train", streaming=True)
    for index, record in enumerate(stream):
        if text_field not in record:
            raise DataError(
                f"{source}: record {index} has no field {text_field!r} (fields: {', '.join(record)}); "
                f"pass --text-field with one of them"
            )
        yield record[text_field]


def _batches(files: list[str], text_field: str, skip: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for source in files:
        for text in read_documents(source, text_field):
            if skip:
                skip -= 1
                continue
            batch.append(text)
            if len(batch) == BATCH_DOCUMENTS:
                yield batch
                batch = []
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def _encoded(batches: Iterator[list[str]], tokenizer_path: str, workers: int) -> Iterator[list[list[int]]]:
    """Batches encoded in order by `workers` processes, at most 2 x workers batches in flight."""
    if workers <= 1:
        tokenizer = load_tokenizer(tokenizer_path)
        for batch in batches:
            yield tokenizer.encode_batch(batch)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) as pool:
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.documents = self.tokens = 0

    def update(self, documents: int, tokens: int, final: bool = False) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        if final or now - self.last >= 1.0:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            print(
                f"\rprepare: {self.documents:,} docs, {self.tokens:,} tokens | "
                f"{self.documents / elapsed:,.0f} docs/s | {self.tokens / elapsed:,.0f} tokens/s",
                end="\n" if final else "",
                file=sys.stderr,
                flush=True,
            )


def _finished_shards(part_dir: Path, tokenizer_hash: str) -> list[dict[str, Any]]:
    """Records of the complete shards, in order; anything after the first gap is discarded."""
    records = []
    for index in range(1 << 30):
        record_path = part_dir / f"shard-{index:05d}.json"
        if not record_path.is_file():
            break
        record = json.loads(record_path.read_text())
        if record["tokenizer_hash"] != tokenizer_hash:
            raise DataError(
                f"{part_dir} was prepared with another tokenizer ({record['tokenizer_hash'][:12]}); "
                f"choose a new --output or delete {part_dir}"
            )
        records.append(record)
    for stale in part_dir.glob("*.tmp"):
        stale.unlink()
    return records


def prepare_part(
    files: list[str],
    tokenizer_path: str,
    part_dir: Path,
    text_field: str,
    workers: int,
    shard_tokens: int,
) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = best_dtype(tokenizer.vocab_size)
    part_dir.mkdir(parents=True, exist_ok=True)
    records = _finished_shards(part_dir, tokenizer.content_hash)
    done_documents = sum(r["num_documents"] for r in records)
    progress = _Progress()
    writer: IndexedDatasetWriter | None = None
    shard_documents = shard_token_count = 0

    def close_shard() -> None:
        nonlocal writer, shard_documents, shard_token_count
        assert writer is not None
        writer.finalize()
        prefix = writer.prefix
        record = {
            "prefix": f"{part_dir.name}/{prefix.name}",
            "num_tokens": shard_token_count,
            "num_documents": shard_documents,
            "bin_sha256": sha256_file(Path(f"{prefix}.bin")),
            "idx_sha256": sha256_file(Path(f"{prefix}.idx")),
            "tokenizer_hash": tokenizer.content_hash,
        }
        write_json_atomically(Path(f"{prefix}.json"), record)  # last: the shard now counts as complete
        records.append(record)
        writer, shard_documents, shard_token_count = None, 0, 0

    eod = np.array([tokenizer.eod_id], dtype=dtype)
    for encoded in _encoded(_batches(files, text_field, done_documents), tokenizer_path, workers):
        for ids in encoded:
            if writer is None:
                writer = IndexedDatasetWriter(part_dir / f"shard-{len(records):05d}", dtype)
            writer.add_document(np.concatenate([np.asarray(ids, dtype=dtype), eod]))
            shard_documents += 1
            shard_token_count += len(ids) + 1
            if shard_token_count >= shard_tokens:
                close_shard()
        progress.update(len(encoded), sum(len(ids) + 1 for ids in encoded))
    if writer is not None:
        close_shard()
    progress.update(0, 0, final=True)
    return records


def prepare(
    inputs: list[str],
    tokenizer_path: str,
    output: str | Path,
    text_field: str = "text",
    workers: int = 1,
    shard_tokens: int = 100_000_000,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Manifest | None:
    """Prepare this job's part; returns the manifest once every part is complete (else None)."""
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    files = resolve_inputs(inputs)
    if not files:
        raise DataError("no input given; pass --input with files, globs or a dataset name")
    output = Path(output)
    part_dir = output / f"part-{shard_index:05d}"
    tokenizer = load_tokenizer(tokenizer_path)
    records = prepare_part(
        files[shard_index::num_shards], tokenizer_path, part_dir, text_field, workers, shard_tokens
    )
    write_json_atomically(part_dir / "done.json", {"num_shards": num_shards, "shards": records})
    parts = [output / f"part-{i:05d}" / "done.json" for i in range(num_shards)]
    if not all(p.is_file() for p in parts):
        return None  # another array job finishes the manifest
    records = [r for p in parts for r in json.loads(p.read_text())["shards"]]
    foreign = {r["tokenizer_hash"] for r in records} - {tokenizer.content_hash}
    if foreign:
        raise DataError(
            f"parts of {output} were prepared with another tokenizer ({', '.join(foreign)}); re-run them"
        )
    shards = [ShardRecord(**{k: v for k, v in r.items() if k != "tokenizer_hash"}) for r in records]
    if not shards or sum(s.num_tokens for s in shards) == 0:
        raise DataError(f"the input {inputs} holds no documents; nothing to prepare")
    manifest = Manifest(
        tokenizer_hash=tokenizer.content_hash,
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod_id,
        dtype=np.dtype(best_dtype(tokenizer.vocab_size)).name,
        num_tokens=sum(s.num_tokens for s in shards),
        num_documents=sum(s.num_documents for s in shards),
        shards=shards,
        source={
            "inputs": inputs,
            "text_field": text_field,
            "num_parts": num_shards,
            "tokenizer": tokenizer_path,
        },
        created_by=f"pretrain {pretrain.__version__}",
    )
    manifest.save(output)
    return manifest


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    return {k: v for k, v in asdict(manifest).items() if k != "shards"} | {"shards": len(manifest.shards)}
