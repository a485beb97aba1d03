"""`data.*`: which prepared datasets are trained on, how they are blended, and the checks of both."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pretrain.config.fields import documented

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
# data.shuffle_block=null on remote data: blocks of this many cache chunks (docs/DATA.md, measured).
AUTO_BLOCK_CHUNKS = 4


def parse_size(text: str | int) -> int:
    """Bytes in a size written as "200GB" (powers of 1000), "64MiB" (powers of 1024) or a plain number."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it as bytes or with a unit, e.g. 200GB or 64MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class DataConfig:
    """Where the training tokens come from."""

    paths: list[str] = documented(
        "Prepared datasets (folders written by `python -m pretrain.data prepare`, local or fsspec URLs). "
        "Empty: the built-in corpus, the Python standard library's own source read as bytes.",
        default_factory=list,
    )
    weights: list[float] | None = documented(
        "Blend weights, one per path (normalised); null weights each dataset by its token count.", None
    )
    validation_fraction: float = documented("Fraction of each dataset held out for validation loss.", 0.02)
    verify_checksums: bool = documented(
        "Check every shard's sha256 against its manifest before training (reads all data once).", False
    )
    cache_dir: str | None = documented(
        "Local cache for remote (fsspec URL) datasets; null: $PRETRAIN_CACHE/datasets or "
        "~/.cache/pretrain/datasets. Shared by the ranks of a node (file locks): keep it node-local.",
        None,
    )
    cache_limit: str = documented(
        "Most disk the cached chunks of remote datasets' .bin files may take (all datasets in cache_dir), "
        "e.g. 200GB or 512MiB; least recently used chunks are evicted beyond it.",
        "100GB",
    )
    cache_chunk: str = documented(
        "Size of the aligned byte ranges of a remote .bin fetched and cached at once, e.g. 16MiB.", "16MiB"
    )
    shuffle_block: int | None = documented(
        "Samples per block of the sample order with locality (order version 3): blocks of consecutive samples "
        "are shuffled, then the samples within windows of data.shuffle_window blocks, so a partial pass reads "
        "about its share of a dataset. 0: a global shuffle (every draw from anywhere). null: 0 for local "
        f"datasets, for remote ones the samples in {AUTO_BLOCK_CHUNKS} x data.cache_chunk bytes. A run keeps "
        "the order it started with.",
        None,
    )
    shuffle_window: int = documented(
        "Blocks per window of that order: any data.shuffle_block x shuffle_window consecutive draws are "
        "shuffled together (more mixes better; each window's blocks are read at once).",
        64,
    )
    remote_attempts: int = documented(
        "Tries of each read from a remote dataset before it is a data error (exponential backoff between).",
        4,
    )
    remote_backoff_s: float = documented("Wait before the second try of a remote read; doubles after.", 1.0)
    remote_timeout_s: float = documented(
        "A remote read (http(s)://, s3://) that connects or sends nothing for this long fails (and is retried).",
        60.0,
    )

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                p.append(
                    f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}; give "
                    f"one weight per path, or data.weights=null to weight by token count"
                )
            if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
                p.append(f"data.weights must be >= 0 with a positive sum, got {self.weights}")
        if len(set(self.paths)) != len(self.paths):
            p.append(
                f"data.paths lists a dataset twice: {self.paths}; use data.weights to sample one more often"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            p.append(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        return p + self._order_problems() + self._cache_problems()

    def _order_problems(self) -> list[str]:
        p: list[str] = []
        if self.shuffle_block is not None and self.shuffle_block < 0:
            p.append(
                f"data.shuffle_block must be >= 0 samples (0: a global shuffle) or null (chosen per dataset), "
                f"got {self.shuffle_block}"
            )
        if self.shuffle_window < 1:
            p.append(
                f"data.shuffle_window must be at least 1 block, got {self.shuffle_window}; 64 mixes each "
                f"window's samples over 64 places in the data"
            )
        return p

    def _cache_problems(self) -> list[str]:
        p: list[str] = []
        sizes = {}
        for key in ("cache_limit", "cache_chunk"):
            try:
                sizes[key] = parse_size(getattr(self, key))
            except ValueError as e:
                p.append(f"data.{key}: {e}")
        if len(sizes) == 2 and not 1 << 10 <= sizes["cache_chunk"] <= sizes["cache_limit"]:
            p.append(
                f"data.cache_chunk ({self.cache_chunk}) must be at least 1KiB and at most data.cache_limit "
                f"({self.cache_limit}); chunks of 4MiB to 64MiB suit object stores"
            )
        if self.remote_attempts < 1:
            p.append(f"data.remote_attempts must be at least 1, got {self.remote_attempts}")
        if self.remote_backoff_s < 0 or self.remote_timeout_s <= 0:
            p.append(
                f"data.remote_backoff_s must be >= 0 and data.remote_timeout_s > 0, got "
                f"{self.remote_backoff_s} and {self.remote_timeout_s}"
            )
        return p
