"""Reading only this rank's pieces of the resharding cache (`universal/`), and counting them.

A cache file holds one parameter of the plain model (unpadded vocabulary) as three fp32 tensors. A
rank of the new layout needs, of each, at most its TP slice (the padded tensor split along the TP
plan's dimension), and under ZeRO often only a flat range of that slice: the part of the parameter
its fp32 partition holds. safetensors memory-maps the file and `get_slice(...)[rows, cols]` copies
only the addressed elements, so a rank touches (and the page cache or the file system fetches) just
those bytes, rounded to pages.

A flat range of the TP slice is read as the whole rows (dim 0) it touches, restricted to the slice's
columns: at most one partial row at each end is read in excess. Vocabulary padding rows are not in
the file; they come back as zeros without being read.

`CacheReads` counts the tensor bytes each rank read against the cache's size, by kind: the figure the
resharded resume logs and `bench/scale.py` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pretrain.config import Config
from pretrain.errors import CheckpointError
from pretrain.model.names import VOCAB_PARAMETERS, is_routed_expert
from pretrain.parallel.topology import ParallelContext
from pretrain.parallel.tp_plan import partition_dim

KINDS = ("fp32", "exp_avg", "exp_avg_sq")
FP32_BYTES = 4


@dataclass
class CacheReads:
    """Tensor bytes this rank read from the cache, and the bytes the whole cache holds, by kind."""

    read: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    cache: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))  # all ranks' files

    @classmethod
    def of_cache(cls, shapes: dict[str, tuple[int, ...]]) -> CacheReads:
        """Nothing read yet, of a cache holding parameters of these (unpadded) shapes."""
        size = sum(math.prod(shape) for shape in shapes.values()) * FP32_BYTES
        return cls(cache=dict.fromkeys(KINDS, size))

    def fraction(self, kinds: tuple[str, ...] = KINDS) -> float:
        """The share of the cache's `kinds` bytes this rank read (1.0: all of it)."""
        total = sum(self.cache[k] for k in kinds)
        return sum(self.read[k] for k in kinds) / total if total else 0.0

    def describe(self) -> str:
        read, total = sum(self.read.values()), sum(self.cache.values())
        moments = ("exp_avg", "exp_avg_sq")
        return (
            f"read {read / 1e6:.2f} MB of the cache's {total / 1e6:.2f} MB ({self.fraction():.1%}: "
            f"masters {self.fraction(('fp32',)):.1%}, moments {self.fraction(moments):.1%})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"read": dict(self.read), "cache": dict(self.cache), "fraction": self.fraction()}


@dataclass(frozen=True)
class TensorSlice:
    """Where this rank's TP slice (or, for a routed expert weight under expert parallelism, its EP
    slice) of a parameter lies in the padded full tensor."""

    shape: tuple[int, ...]  # the TP slice's shape (vocabulary padded)
    dim: int | None  # the TP plan's split dimension (None: the whole tensor)
    offset: int  # the slice's first index along `dim`

    @classmethod
    def of(cls, name: str, full_shape: tuple[int, ...], cfg: Config, ctx: ParallelContext) -> TensorSlice:
        shape = list(full_shape)
        if name in VOCAB_PARAMETERS:
            shape[0] = cfg.padded_vocab_size
        if ctx.ep > 1 and is_routed_expert(name):  # this EP rank's experts (routed experts have no TP split)
            shape[0] //= ctx.ep
            return cls(tuple(shape), 0, ctx.ep_rank * shape[0])
        dim = partition_dim(name) if ctx.tp > 1 else None
        offset = 0
        if dim is not None:
            shape[dim] //= ctx.tp
            offset = ctx.tp_rank * shape[dim]
        return cls(tuple(shape), dim, offset)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])


class CacheFile:
    """One parameter's cache file, open for slice reads counted into `reads`."""

    def __init__(self, cache: Path, name: str, full_shape: tuple[int, ...], reads: CacheReads):
        self.path, self.name, self.full_shape, self.reads = (
            cache / f"{name}.safetensors",
            name,
            full_shape,
            reads,
        )
        try:
            self._file = safe_open(str(self.path), framework="pt")
            slices = {kind: self._file.get_slice(kind) for kind in KINDS}
        except (SafetensorError, OSError) as e:
            raise self._unreadable(e) from e
        self._slices = slices
        for kind, tensor_slice in slices.items():
            if tuple(tensor_slice.get_shape()) != full_shape or tensor_slice.get_dtype() != "F32":
                raise CheckpointError(
                    f"{self.path} holds {kind} as {tensor_slice.get_dtype()} {tensor_slice.get_shape()}, the model "
                    f"needs F32 {list(full_shape)}; {self._fix}"
                )

    @property
    def _fix(self) -> str:
        return (
            f"delete {self.path.parent} and resume again to rebuild the resharding cache from the checkpoint"
        )

    def _unreadable(self, e: Exception) -> CheckpointError:
        return CheckpointError(f"{self.path} cannot be read ({e}): it is truncated or corrupt; {self._fix}")

    def whole(self, kind: str, part: TensorSlice) -> torch.Tensor:
        """This rank's whole TP slice of `kind`."""
        return self.rows(kind, part, 0, part.shape[0]).view(part.shape)

    def flat(self, kind: str, part: TensorSlice, start: int, size: int) -> torch.Tensor:
        """Elements [start, start + size) of the flattened TP slice, zeros past its end (ZeRO-3 pads
        the last rank's partition)."""
        end = min(start + size, part.numel)
        out = torch.zeros(size, dtype=torch.float32)
        if start < end:
            first, last = start // part.row_numel, -(-end // part.row_numel)
            block = self.rows(kind, part, first, last).flatten()
            skip = start - first * part.row_numel
            out[: end - start] = block[skip : skip + end - start]
        return out

    def rows(self, kind: str, part: TensorSlice, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of the TP slice; vocabulary padding rows as zeros, never read."""
        index: list[slice] = [slice(None)] * len(part.shape)
        if part.dim is not None:
            index[part.dim] = slice(part.offset, part.offset + part.shape[part.dim])
        base = part.offset if part.dim == 0 else 0
        stored = self.full_shape[0]  # rows past it are vocabulary padding
        lo, hi = min(base + first, stored), min(base + last, stored)
        index[0] = slice(lo, hi)
        try:
            block = self._slices[kind][tuple(index)] if hi > lo else None
        except (SafetensorError, OSError, RuntimeError) as e:
            raise self._unreadable(e) from e
        out = torch.zeros((last - first, *part.shape[1:]), dtype=torch.float32)
        if block is not None:
            self.reads.read[kind] += block.numel() * FP32_BYTES
            out[: hi - lo] = block
        return out

    def close(self) -> None:
        self._slices.clear()
        self._file.__exit__(None, None, None)

    def __enter__(self) -> CacheFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
