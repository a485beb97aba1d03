"""`manifest.json`: what a prepared dataset holds, and the checks that it still holds it."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.data.tokenizer import Tokenizer, load_tokenizer
from pretrain.errors import DataError

FORMAT = "pretrain-megatron-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# A re-run alone keeps a shard whose record and size are intact: prepare does not re-read its sha256.
REWRITE_SHARD = (
    "delete that shard's .bin, .idx and .json and re-run the same `python -m pretrain.data prepare` command "
    "(it rewrites that shard and the ones after it)"
)


@dataclass
class ShardRecord:
    prefix: str  # relative to the dataset folder, without .bin/.idx
    num_tokens: int
    num_documents: int
    bin_sha256: str
    idx_sha256: str


@dataclass
class Manifest:
    tokenizer_hash: str
    vocab_size: int
    eod_id: int
    dtype: str
    num_tokens: int
    num_documents: int
    shards: list[ShardRecord]
    source: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def save(self, folder: Path) -> None:
        write_json_atomically(folder / MANIFEST, asdict(self))


def write_json_atomically(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never half of one. The temporary name is unique
    across hosts: array jobs on different nodes may write the same manifest at the same moment."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        parts = sorted(p.parent.name for p in Path(folder).glob("part-*/part.json"))
        done = sorted(p.parent.name for p in Path(folder).glob("part-*/done.json"))
        hint = f" (parts finished: {done or 'none'} of those started: {parts})" if parts else ""
        raise DataError(
            f"{path} does not exist{hint}; make the dataset with "
            f"`python -m pretrain.data prepare --input ... --tokenizer ... --output {folder}`"
        )
    return parse_manifest(path.read_text(), path)


def parse_manifest(text: str | bytes, path: str | Path) -> Manifest:
    """A manifest from its text (read locally, or fetched from a remote dataset's `path`)."""
    try:
        raw = json.loads(text)
        raw["shards"] = [ShardRecord(**s) for s in raw["shards"]]
        manifest = Manifest(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is not a valid manifest ({e}); re-run prepare") from e
    if manifest.format != FORMAT or manifest.format_version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format {manifest.format} v{manifest.format_version}; expected {FORMAT} v{FORMAT_VERSION}"
        )
    return manifest


def require_tokens(folder: str | Path, manifest: Manifest) -> Manifest:
    if manifest.num_tokens == 0:
        raise DataError(f"dataset {folder} holds no tokens; prepare it from non-empty input")
    return manifest


def verify(folder: str | Path, checksums: bool = True) -> Manifest:
    """Every shard exists, parses, and matches the manifest's counts (and sha256 if `checksums`)."""
    from pretrain.data.indexed import IndexedDataset, ShardError

    folder = Path(folder)
    manifest = require_tokens(folder, load_manifest(folder))
    for shard in manifest.shards:
        opened = IndexedDataset(folder / shard.prefix)
        if opened.dtype.name != manifest.dtype:
            raise ShardError(
                f"{opened.idx_path} holds {opened.dtype} tokens but {folder / MANIFEST} says {manifest.dtype}; "
                f"the shard is from another dataset: re-run prepare"
            )
        if (opened.num_tokens, opened.num_documents) != (shard.num_tokens, shard.num_documents):
            raise ShardError(
                f"{opened.bin_path} holds {opened.num_tokens} tokens in {opened.num_documents} documents, but "
                f"{folder / MANIFEST} records {shard.num_tokens} in {shard.num_documents}; re-run prepare"
            )
        if checksums:
            for path, expected in ((opened.bin_path, shard.bin_sha256), (opened.idx_path, shard.idx_sha256)):
                if sha256_file(path) != expected:
                    raise ShardError(
                        f"{path} does not match the sha256 in {folder / MANIFEST}; the file changed or is corrupt: {REWRITE_SHARD}"
                    )
    return manifest


def recorded_tokenizer(manifest: Manifest) -> Tokenizer | None:
    """The tokenizer at the path prepare was given, if it is still there and still the one the data
    was made with (its hash); None otherwise: nothing to check the manifest against then."""
    path = manifest.source.get("tokenizer")
    if not path or not Path(path).exists():
        return None
    try:
        tokenizer = load_tokenizer(path)
    except DataError:
        return None
    return tokenizer if tokenizer.content_hash == manifest.tokenizer_hash else None


def check_vocabulary(manifest: Manifest, dataset: str | Path, tokenizer: Tokenizer) -> None:
    """The manifest's vocabulary size and end-of-document id are those of `tokenizer`, the one it was
    prepared with (same hash): training bounds token ids and sizes the model by them."""
    folder = str(dataset).rstrip("/")
    for what, recorded, actual in (
        ("vocab_size", manifest.vocab_size, tokenizer.vocab_size),
        ("eod_id", manifest.eod_id, tokenizer.eod_id),
    ):
        if recorded != actual:
            raise DataError(
                f"{folder}/{MANIFEST} records {what} {recorded}, but the tokenizer it was prepared with "
                f"({tokenizer.source}, hash {tokenizer.content_hash[:16]}) has {what} {actual}: the manifest "
                f"was edited or is damaged; rewrite it from the parts' records with `python -m pretrain.data "
                f"merge {folder}`, or re-run prepare"
            )
