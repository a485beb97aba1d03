"""Writing safetensors one tensor at a time, and splitting a model into shards.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. The format is simple
enough to stream: an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw bytes in that order. Shapes are known before any tensor is read
(from the model config), so the header is written first and each tensor follows as it arrives:
memory stays at one tensor whatever the file size. The file appears under its name only once
complete (written as a temporary file, fsynced, renamed).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

DTYPE_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
}
_ALIGN = 8  # the safetensors library pads its header to 8 bytes; readers expect aligned data


class SafetensorsWriter:
    """Write the tensors named in `entries` (name, dtype, shape), in that order, to `path`."""

    def __init__(
        self,
        path: Path,
        entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._expected = list(entries)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self.nbytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGN)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._tmp.open("wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        want_name, want_dtype, want_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want_name, want_dtype, tuple(want_shape)):
            raise ValueError(
                f"{self.path}: expected tensor {want_name} {want_dtype} {list(want_shape)} next, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().cpu().contiguous()
        self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy of the bytes
        self._next += 1

    def close(self) -> None:
        missing = [name for name, _, _ in self._expected[self._next :]]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} tensors were never written, first {missing[0]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a number of bytes (decimal units, as Hugging Face counts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    return int(number * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a bigger tensor gets a
    shard of its own); the order of the tensors is kept."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes:
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names: model.safetensors alone, else model-00001-of-0000N.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
