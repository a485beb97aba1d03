"""Raw text -> tokenized Megatron-format shards + manifest, in parallel, resumable, memory-bounded.

Layout of OUTPUT (one part per array job; a single run is part 0 of 1):

    OUTPUT/part-00000/part.json                    the part's settings (a re-run must match them)
    OUTPUT/part-00000/shard-00000.{bin,idx,json}   shards of about `shard_tokens` tokens at most
    OUTPUT/part-00000/done.json                    written when the part is complete
    OUTPUT/manifest.json                           written once every part is complete

A shard counts only once its `.json` record exists (written after its .bin and .idx are fsynced and
renamed), so an interrupted run leaves no shard that looks complete. A re-run skips the documents of
the finished shards (reading, not tokenizing them) and continues; shard boundaries depend only on
the input, the tokenizer and `shard_tokens`, so the result equals that of an uninterrupted run.

Array jobs (`shard_index` i of `num_shards` n): with at least n input files, job i takes the sorted
files i, i + n, i + 2n, ...; with fewer files (one big file, a hub dataset), every job reads all the
input and keeps the documents whose position mod n is i. Each job writes its own part folder, so
names never collide. Whichever job finds every part's done.json after writing its own writes
manifest.json (the same content whoever writes it, replaced atomically); `merge` does the same by
hand. The dataset's document order is part 0's documents, then part 1's, and so on.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import pretrain
from pretrain.data.indexed import IndexedDatasetWriter, best_dtype
from pretrain.data.inputs import check_same_input, content_hashes, stale_input
from pretrain.data.manifest import MANIFEST, Manifest, ShardRecord, sha256_file, write_json_atomically
from pretrain.data.tokenizer import Tokenizer, load_tokenizer
from pretrain.errors import DataError

DEFAULT_SHARD_TOKENS = 100_000_000
# Batches are cut by size, not document count: 512 documents of a code corpus can be one worker's
# whole share while the other idles. Small batches balance the workers; each costs ~1 ms to ship.
BATCH_CHARS = 1 << 18
BATCH_DOCUMENTS = 1024
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
}
_COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4"}


def builder_for(source: str) -> str | None:
    """The `datasets` builder for a local file from its extension (compressed files included)."""
    suffixes = [s.lower() for s in Path(source).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Local files matching the patterns (each pattern's matches sorted; folders expanded to the
    files inside them that we can read), or the names themselves for hub datasets."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            if builder_for(pattern) or "*" in pattern or "?" in pattern or Path(pattern).exists():
                raise DataError(f"--input {pattern!r} matches no file; check the path or the glob's quoting")
            files.append(pattern)  # a hub dataset name, read with streaming=True
            continue
        for match in matches:
            if Path(match).is_dir():
                inside = sorted(str(p) for p in Path(match).rglob("*") if p.is_file() and builder_for(str(p)))
                if not inside:
                    raise DataError(
                        f"--input {match!r} is a folder with no .jsonl/.json/.parquet/.txt/.csv file; "
                        f"point --input at the files"
                    )
                files += inside
            else:
                files.append(match)
    return list(dict.fromkeys(files))  # overlapping patterns must not duplicate a file's documents


def _open_stream(source: str) -> Any:
    from datasets import load_dataset

    builder = builder_for(source)
    try:
        if builder == "json":
            # datasets parses 10 MB of JSON at a time by default; 1 MB keeps this process smaller at
            # no measurable cost (a longer line is still read whole).
            return load_dataset(
                builder, data_files=[source], split="train", streaming=True, chunksize=1 << 20
            )
        if builder:
            return load_dataset(builder, data_files=[source], split="train", streaming=True)
        return load_dataset(source, split="train", streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFound, ConnectionError, ValueError...)
        what = "file" if builder else "dataset name (not a local file, so read from the Hugging Face hub)"
        raise DataError(f"--input {source!r}: cannot open this {what}: {type(e).__name__}: {e}") from e


def read_documents(source: str, text_field: str) -> Iterator[str]:
    """Documents of one file (or hub dataset) through `datasets`, streamed: memory stays bounded."""
    if builder_for(source) and Path(source).stat().st_size == 0:
        return  # `datasets` fails on an empty file instead of yielding nothing
    stream = _open_stream(source)
    index = 0
    batches = stream.iter(batch_size=256)  # columns, not a dict per row: reading costs half as much
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(
                f"{source}: cannot read record {index} onwards ({type(e).__name__}: {e}); "
                f"check that the file is valid {builder_for(source) or 'data'}"
            ) from e
        if text_field not in batch:
            raise DataError(
                f"{source}: record {index} has no field {text_field!r} (fields: {', '.join(batch)}); "
                f"pass --text-field with one of them"
            )
        for offset, text in enumerate(batch[text_field]):
            if not isinstance(text, str):
                raise DataError(
                    f"{source}: record {index + offset} has {text_field!r} = {type(text).__name__}, not "
                    f"text; clean the input or pass --text-field naming a text column"
                )
            yield text
        index += len(batch[text_field])


@dataclass
class PartSpec:
    """Everything that decides a part's bytes; stored in part.json so a re-run cannot mix settings."""

    files: list[str]
    split: str  # "files": this part's own files; "documents": every n-th document of all files
    shard_index: int
    num_shards: int
    text_field: str
    shard_tokens: int
    append_eod: bool
    tokenizer_hash: str
    dtype: str
    # Local files only: changed input makes the part start over (pretrain/data/inputs.py says why content).
    file_hashes: dict[str, str] = field(default_factory=dict)


def part_spec(
    files: list[str], shard_index: int, num_shards: int, tokenizer: Tokenizer, text_field: str,
    shard_tokens: int, append_eod: bool,
) -> PartSpec:  # fmt: skip
    if len(files) >= num_shards:
        split, mine = "files", files[shard_index::num_shards]
    else:
        split, mine = "documents", files
    return PartSpec(
        mine, split, shard_index, num_shards, text_field, shard_tokens, append_eod,
        tokenizer.content_hash, np.dtype(best_dtype(tokenizer.vocab_size)).name,
        content_hashes([f for f in mine if Path(f).is_file()]),
    )  # fmt: skip


def part_documents(spec: PartSpec) -> Iterator[str]:
    """This part's documents in order (deterministic: the same on every re-run)."""
    texts = itertools.chain.from_iterable(read_documents(f, spec.text_field) for f in spec.files)
    if spec.split == "files":
        return texts
    return itertools.islice(texts, spec.shard_index, None, spec.num_shards)


def _batches(texts: Iterator[str], skip: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in itertools.islice(texts, skip, None):
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, append_eod: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens back to back, tokens per document): two arrays ship between processes far cheaper
    than lists of Python ints, and the writer takes them in one write."""
    ids = tokenizer.encode_batch(texts)
    extra = [tokenizer.eod_id] if append_eod else []
    sizes = np.fromiter((len(x) + len(extra) for x in ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(x, extra) for x in ids),
        dtype=dtype,
        count=int(sizes.sum(dtype=np.int64)),
    )
    return flat, sizes


_worker: tuple[Tokenizer, np.dtype, bool] | None = None


def _init_worker(tokenizer_path: str, dtype: str, append_eod: bool) -> None:
    global _worker
    _worker = (load_tokenizer(tokenizer_path), np.dtype(dtype), append_eod)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None
    return encode_documents(_worker[0], texts, _worker[1], _worker[2])


def _encoded(
    batches: Iterator[list[str]], tokenizer_path: str, spec: PartSpec, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches encoded in order by `workers` processes, at most 2 x workers batches in flight."""
    if workers <= 1:
        tokenizer = load_tokenizer(tokenizer_path)
        for batch in batches:
            yield encode_documents(tokenizer, batch, np.dtype(spec.dtype), spec.append_eod)
        return
    import multiprocessing as mp
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork starts a worker in milliseconds; spawn re-imports the package (torch included) in each.
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    # An executor, not multiprocessing.Pool: a worker killed (out of memory) makes Pool wait forever,
    # the executor raises BrokenProcessPool.
    executor = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker,
        initargs=(tokenizer_path, spec.dtype, spec.append_eod),
    )  # fmt: skip
    with executor:
        # One tokenizer thread per worker process: `workers` is the number of cores used. Set around
        # the fork only (the first submit forks every worker, before any reader thread exists here),
        # so the children inherit it and this process keeps its own setting.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            executor.submit(int).result()
        finally:
            if previous is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        pending: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque()
        try:
            for batch in batches:
                pending.append(executor.submit(_encode_in_worker, batch))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as e:
            raise DataError(
                f"a tokenizer worker died ({e}); it may have run out of memory: re-run with fewer "
                f"--workers (prepare continues after the finished shards)"
            ) from e
        finally:
            for future in pending:
                future.cancel()


class _Progress:
    """A carriage-return line on stderr refreshed each second on a terminal; in a log file (a SLURM
    job's), whole lines every 30 s, so the log stays readable."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = self.last = time.perf_counter()
        self.documents = self.tokens = 0
        self.tty = sys.stderr.isatty()

    def update(self, documents: int, tokens: int, final: bool = False) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        if final or now - self.last >= (1.0 if self.tty else 30.0):
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            start = "\r" if self.tty else ""
            print(
                f"{start}{self.label}: {self.documents:,} docs, {self.tokens:,} tokens | "
                f"{self.documents / elapsed:,.0f} docs/s | {self.tokens / elapsed:,.0f} tokens/s",
                end="\n" if final or not self.tty else "",
                file=sys.stderr,
                flush=True,
            )


def _shard_files(part_dir: Path, index: int) -> list[Path]:
    stem = f"shard-{index:05d}"
    return [part_dir / f"{stem}{ext}" for ext in (".json", ".idx", ".bin", ".bin.tmp", ".idx.tmp")]


def _finished_shards(part_dir: Path, spec: PartSpec) -> list[dict[str, Any]]:
    """Records of the complete shards, in order. Everything from the first incomplete shard on (a
    missing record or file, a file of the wrong size, temporary files) is deleted: it is rewritten."""
    itemsize = np.dtype(spec.dtype).itemsize
    records: list[dict[str, Any]] = []
    while True:
        record_path, idx, bin_path, *_ = _shard_files(part_dir, len(records))
        if not (record_path.is_file() and idx.is_file() and bin_path.is_file()):
            break
        record = json.loads(record_path.read_text())
        if bin_path.stat().st_size != record["num_tokens"] * itemsize:
            break
        records.append(record)
    for path in part_dir.glob("shard-*"):
        index = path.name.split(".")[0].removeprefix("shard-")
        if not index.isdigit() or int(index) >= len(records):
            path.unlink()
    return records


def _check_spec(part_dir: Path, spec: PartSpec) -> None:
    """A re-run continues a part only with the settings it was started with, and only on the input it
    was started on: changed input makes the finished shards stale, so the part starts over. A part
    with no finished shard has nothing to reuse: it simply starts over (e.g. after fixing a wrong
    --text-field)."""
    path = part_dir / "part.json"
    if path.is_file():
        old = json.loads(path.read_text())
        settings = {
            k: (old.get(k), v) for k, v in asdict(spec).items() if k != "file_hashes" and old.get(k) != v
        }
        stale = stale_input(old, spec.file_hashes)
        if not settings and stale is None:
            return
        finished = any(part_dir.glob("shard-*.json"))
        if settings and finished:
            diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in settings.items())
            raise DataError(
                f"{part_dir} was started with other settings or input ({diff}); re-run with the original "
                f"options, or choose a new --output (or delete {part_dir}) to start over"
            )
        if stale is not None and (finished or (part_dir / "done.json").is_file()):
            print(f"{part_dir}: {stale}; preparing this part again from the start", file=sys.stderr)
            for old_file in part_dir.glob("shard-*"):
                old_file.unlink()
            # It lists this part's old shards: a dataset is complete again only once every part is.
            (part_dir.parent / MANIFEST).unlink(missing_ok=True)
        (part_dir / "done.json").unlink(missing_ok=True)
    part_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, asdict(spec))


def prepare_part(
    spec: PartSpec, tokenizer_path: str, part_dir: Path, workers: int, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """Tokenize this part into shards (resuming after its finished ones); returns the shard records.
    `meta` goes into done.json with them, for whoever merges the parts."""
    _check_spec(part_dir, spec)
    done = part_dir / "done.json"
    if done.is_file():
        records = _finished_shards(part_dir, spec)
        if records == json.loads(done.read_text())["shards"]:
            print(f"{part_dir}: already complete, {len(records)} shards", file=sys.stderr)
            return records
        done.unlink()
    records = _finished_shards(part_dir, spec)
    skip = sum(r["num_documents"] for r in records)
    if records:
        print(
            f"{part_dir}: resuming after {len(records)} finished shards ({skip:,} documents)", file=sys.stderr
        )
    progress = _Progress(f"prepare {part_dir.name}")
    writer: IndexedDatasetWriter | None = None

    def close_shard(writer: IndexedDatasetWriter) -> None:
        writer.finalize()
        prefix = writer.prefix
        record = {
            "prefix": f"{part_dir.name}/{prefix.name}",
            "num_tokens": writer.num_tokens,
            "num_documents": writer.num_documents,
            "bin_sha256": sha256_file(Path(f"{prefix}.bin")),
            "idx_sha256": sha256_file(Path(f"{prefix}.idx")),
        }
        write_json_atomically(Path(f"{prefix}.json"), record)  # last: the shard now counts as complete
        records.append(record)

    try:
        for flat, sizes in _encoded(_batches(part_documents(spec), skip), tokenizer_path, spec, workers):
            start = pos = 0
            while start < len(sizes):
                if writer is None:
                    writer = IndexedDatasetWriter(part_dir / f"shard-{len(records):05d}", spec.dtype)
                # The shard closes after the first document that brings it to shard_tokens, exactly
                # as if documents were added one by one: boundaries do not depend on batching.
                ends = np.cumsum(sizes[start:], dtype=np.int64)
                take = int(np.searchsorted(ends, spec.shard_tokens - writer.num_tokens)) + 1
                full = take <= len(ends)
                take = min(take, len(ends))
                count = int(ends[take - 1])
                writer.add_documents(flat[pos : pos + count], sizes[start : start + take])
                start, pos = start + take, pos + count
                if full:
                    close_shard(writer)
                    writer = None
            progress.update(len(sizes), len(flat))
        if writer is not None:
            close_shard(writer)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    progress.update(0, 0, final=True)
    write_json_atomically(done, {**meta, "shards": records})
    return records


def prepare(
    inputs: list[str],
    tokenizer: str | Path,
    output: str | Path,
    text_field: str = "text",
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    shard_index: int = 0,
    num_shards: int = 1,
    append_eod: bool = True,
) -> Manifest | None:
    """Prepare this job's part; returns the manifest once every part is complete (else None)."""
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens} must be at least 1")
    files = resolve_inputs(inputs)
    if not files:
        raise DataError("no input given; pass --input with files, globs or a dataset name")
    output = Path(output)
    loaded = load_tokenizer(tokenizer)
    spec = part_spec(files, shard_index, num_shards, loaded, text_field, shard_tokens, append_eod)
    meta = {
        "tokenizer": {"hash": loaded.content_hash, "vocab_size": loaded.vocab_size, "eod_id": loaded.eod_id},
        "source": {
            "inputs": inputs,
            "text_field": text_field,
            "tokenizer": str(tokenizer),
            "num_parts": num_shards,
            "split": spec.split,
            "shard_tokens": shard_tokens,
            "append_eod": append_eod,
        },
    }
    prepare_part(spec, str(tokenizer), output / f"part-{shard_index:05d}", workers, meta)
    return merge(output, required=False)


def merge(output: str | Path, required: bool = True) -> Manifest | None:
    """Write manifest.json from the parts' done.json once all of them exist. With parts missing:
    None, or with `required` an error naming them. Any job (or a person) may call it any number of
    times: the result is the same, and it replaces manifest.json atomically."""
    output = Path(output)
    specs = [json.loads(p.read_text()) for p in sorted(output.glob("part-*/part.json"))]
    if not specs:
        raise DataError(f"{output} holds no part-*/part.json; run `python -m pretrain.data prepare` first")
    counts = {s["num_shards"] for s in specs}
    if len(counts) > 1:
        raise DataError(
            f"the parts in {output} were made with different --num-shards {sorted(counts)}; "
            f"delete the parts of the other run and re-run"
        )
    num_parts = counts.pop()
    check_same_input(output, specs)
    done_paths = [output / f"part-{i:05d}" / "done.json" for i in range(num_parts)]
    missing = [i for i, p in enumerate(done_paths) if not p.is_file()]
    if missing:
        if not required:
            return None
        raise DataError(
            f"{output}: parts {missing} of {num_parts} are not complete; run `python -m pretrain.data "
            f"prepare ... --shard-index I --num-shards {num_parts}` for each"
        )
    parts = [json.loads(p.read_text()) for p in done_paths]
    hashes = {p["tokenizer"]["hash"] for p in parts}
    if len(hashes) > 1:
        raise DataError(
            f"the parts of {output} were prepared with different tokenizers ({', '.join(sorted(hashes))}); "
            f"re-run the odd ones with the same --tokenizer, or choose a new --output"
        )
    tokenizer = parts[0]["tokenizer"]
    shards = [ShardRecord(**r) for p in parts for r in p["shards"]]
    if sum(s.num_documents for s in shards) == 0:
        raise DataError(
            f"the input {parts[0]['source']['inputs']} holds no documents; nothing to prepare: check --input"
        )
    manifest = Manifest(
        tokenizer_hash=tokenizer["hash"],
        vocab_size=tokenizer["vocab_size"],
        eod_id=tokenizer["eod_id"],
        dtype=specs[0]["dtype"],
        num_tokens=sum(s.num_tokens for s in shards),
        num_documents=sum(s.num_documents for s in shards),
        shards=shards,
        source=parts[0]["source"],
        created_by=f"pretrain {pretrain.__version__}",
    )
    manifest.save(output)
    return manifest


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    return {k: v for k, v in asdict(manifest).items() if k != "shards"} | {"shards": len(manifest.shards)}
