"""What a prepared part was made from: each local input file's content hash, recorded in part.json.

Content, not size or mtime: an edit that keeps a file's size must make its part start over, and the
same bytes with a new mtime (a `touch`, a copy) must not. The whole file is hashed with XXH3-128:
measured 5.6 GB/s on one core here (blake2b 0.83, sha1 1.5, sha256 1.4 GB/s; a 315 MB file in the
page cache), against ~4 MB/s of input that tokenizing takes on two cores (docs/DATA.md), so hashing
every byte costs ~0.1% of a prepare. A sampled hash (size, mtime and a few blocks) would save
nothing worth the edits between its samples that it misses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pretrain.errors import DataError


def content_hashes(files: list[str]) -> dict[str, str]:
    """{file: "xxh3_128:<hex>"} over each file's every byte."""
    import xxhash

    total = sum(Path(f).stat().st_size for f in files)
    if total >= 1 << 30:  # a silent pause of a minute or more would look like a hang
        print(
            f"hashing {len(files)} input files ({total / 1e9:.1f} GB) to recognise changed input",
            file=sys.stderr,
        )
    hashes = {}
    for name in files:
        digest = xxhash.xxh3_128()
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        hashes[name] = f"xxh3_128:{digest.hexdigest()}"
    return hashes


def stale_input(old_spec: dict[str, Any], hashes: dict[str, str]) -> str | None:
    """Why the shards of the part that `old_spec` (its earlier part.json) describes may not hold the
    input that has `hashes` now; None when they do."""
    if "file_hashes" not in old_spec:
        if not hashes:
            return None  # a hub dataset: no content to compare, then or now
        return "its part.json is from an earlier version that recorded the input's sizes, not its content"
    changed = [f for f, h in hashes.items() if old_spec["file_hashes"].get(f) != h]
    return f"the content of {', '.join(changed)} changed since it was prepared" if changed else None


def check_same_input(output: Path, specs: list[dict[str, Any]]) -> None:
    """Parts that read the same file (every part, when they split one file by document) must have
    read the same content: an input edited between two array jobs would mix two versions."""
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        for name, digest in spec.get("file_hashes", {}).items():
            first = seen.setdefault(name, (spec["shard_index"], digest))
            if first[1] != digest:
                raise DataError(
                    f"parts {first[0]} and {spec['shard_index']} of {output} were prepared from different "
                    f"content of {name} (it changed in between); run prepare again for every part: the "
                    f"parts made from other content than the current file's start over, the others are kept"
                )
