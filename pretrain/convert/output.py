"""What every conversion shares: its report, and writing OUTPUT so that it is either absent or whole
(a temporary sibling, renamed into place when complete)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import ConversionError


@dataclass
class Report:
    output: Path
    files: list[str]
    provenance: dict[str, Any]
    verification: Any = None  # pretrain.convert.verify.Verification
    notes: list[str] = field(default_factory=list)


def _fresh_output(output: Path, overwrite: bool) -> Path:
    """A temporary sibling of `output` to write into."""
    if output.exists() and not overwrite:
        raise ConversionError(
            f"{output} already exists; choose another --output, or pass --overwrite to replace it"
        )
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def _move_into_place(tmp: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    tmp.rename(output)


class _Progress:
    """A line every few seconds while tensors stream (a 70B export takes a while)."""

    def __init__(self, total: int, verb: str):
        self.total, self.verb, self.done, self.last = total, verb, 0, time.monotonic()

    def wrap(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for item in tensors:
            self.done += 1
            if time.monotonic() - self.last > 10:
                self.last = time.monotonic()
                print(f"{self.verb} {self.done}/{self.total} tensors ({item[0]})", flush=True)
            yield item
