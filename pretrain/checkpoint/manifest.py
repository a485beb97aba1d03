"""What makes a checkpoint complete, and the catalogue of a run's checkpoints.

A checkpoint is the folder `checkpoints/stepNNNNNNNN/`. It is written as `.stepNNNNNNNN.partial/`
by every rank; once all ranks have written and fsynced their files, rank 0 writes `manifest.json`
(every file with its size and checksum), renames the folder to its final name and only then
replaces the `latest` pointer (DeepSpeed's file name and format: the tag, so DeepSpeed's own tools
still find it). A folder without a manifest, or whose files disagree with it, is not a checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.checkpoint.files import (
    CHECKSUM,
    file_checksum,
    fsync_dir,
    replace_atomically,
    write_json_atomically,
)
from pretrain.errors import CheckpointError, InvalidCheckpoint

FORMAT = "pretrain-checkpoint-v1"
MANIFEST = "manifest.json"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8,})$")
_PARTIAL = re.compile(r"^\.step(\d{8,})\.partial$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def partial_name(step: int) -> str:
    return f".{tag_for(step)}.partial"


def step_of(path: Path) -> int | None:
    match = _TAG.match(path.name)
    return int(match.group(1)) if match else None


@dataclass
class FileEntry:
    size: int
    checksum: str


@dataclass
class Manifest:
    tag: str
    step: int
    files: dict[str, FileEntry]
    world_size: int
    created: float = field(default_factory=time.time)
    checksum: str = CHECKSUM
    format: str = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json_atomically(folder / MANIFEST, manifest.to_json())


def read_manifest(folder: Path) -> Manifest:
    """The manifest of `folder`; InvalidCheckpoint says why there is none that can be used.

    Whatever the file holds (truncated, not JSON, valid JSON of another shape), a manifest that does
    not parse into exactly the fields below means "not complete", never a crash."""
    path = folder / MANIFEST
    if not path.is_file():
        raise InvalidCheckpoint(folder, "it has no manifest.json (the save did not finish)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidCheckpoint(folder, f"manifest.json is unreadable ({e!r})") from e
    if not isinstance(data, dict):
        raise InvalidCheckpoint(folder, f"manifest.json holds a {type(data).__name__}, not an object")
    if data.get("format") != FORMAT:
        raise InvalidCheckpoint(folder, f"manifest.json has format {data.get('format')!r}, not {FORMAT!r}")
    problem = _schema_problem(data)
    if problem:
        raise InvalidCheckpoint(folder, f"manifest.json is malformed: {problem}")
    return Manifest(
        tag=data["tag"],
        step=data["step"],
        files={name: FileEntry(e["size"], e["checksum"]) for name, e in data["files"].items()},
        world_size=data["world_size"],
        created=float(data["created"]),
        checksum=data["checksum"],
    )


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "tag": str,
    "step": int,
    "world_size": int,
    "created": (int, float),
    "checksum": str,
    "files": dict,
}


def _schema_problem(data: dict[str, Any]) -> str | None:
    """The first way `data` is not a manifest, or None."""
    for key, expected in _FIELD_TYPES.items():
        value = data.get(key)
        if not isinstance(value, expected) or isinstance(value, bool):
            return f"{key!r} is {value!r}"
    if data["step"] < 0 or data["world_size"] < 1:
        return f"step {data['step']} / world_size {data['world_size']} out of range"
    for name, entry in data["files"].items():
        if not (isinstance(entry, dict) and set(entry) == {"size", "checksum"}):
            return f"the entry of {name!r} is {entry!r}"
        size, checksum = entry["size"], entry["checksum"]
        if not (
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(checksum, str)
        ):
            return f"the entry of {name!r} is {entry!r}"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"file name {name!r} points outside the checkpoint folder"
    return None


def check_sizes(folder: Path, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size (cheap: one stat per file)."""
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise InvalidCheckpoint(folder, f"{name} is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise InvalidCheckpoint(folder, f"{name} has {size:,} bytes, the manifest says {entry.size:,}")


def check_checksums(folder: Path, manifest: Manifest, names: Iterable[str]) -> None:
    """The listed files `names` hash to their recorded checksums (reads them)."""
    if manifest.checksum != CHECKSUM:
        raise InvalidCheckpoint(
            folder, f"manifest.json uses checksum {manifest.checksum!r}, not {CHECKSUM!r}"
        )
    for name in names:
        if file_checksum(folder / name) != manifest.files[name].checksum:
            raise InvalidCheckpoint(folder, f"{name} does not match its checksum (corrupt)")


def split_for_ranks(manifest: Manifest, world_size: int) -> list[list[str]]:
    """The manifest's files dealt to `world_size` verifiers, largest first to the least loaded one."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for name, entry in sorted(manifest.files.items(), key=lambda item: -item[1].size):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += entry.size
    return shares


# ---------------------------------------------------------------------------------------------
# The catalogue of a checkpoints directory


def checkpoint_folders(directory: Path) -> list[Path]:
    """Folders named like checkpoints (complete or not), newest step first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def stale_partials(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_dir() and _PARTIAL.match(p.name)]


def read_latest(directory: Path) -> str | None:
    path = directory / LATEST
    return path.read_text().strip() if path.is_file() else None


def commit(partial: Path, manifest: Manifest) -> Path:
    """Turn a fully written `.stepN.partial` folder into `stepN` and point `latest` at it."""
    write_manifest(partial, manifest)
    fsync_dir(partial)
    final = partial.parent / manifest.tag
    if final.exists():  # an older save of the same step (e.g. before a rollback or a requeue)
        try:
            read_manifest(final)
            doomed: Path | None = partial.parent / f".{manifest.tag}.replaced.{time.time_ns()}"
        except InvalidCheckpoint:  # a damaged one is kept for inspection, under a name never resumed
            doomed = None
        aside = doomed or partial.parent / f"{manifest.tag}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        final.rename(aside)
        partial.rename(final)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
    else:
        partial.rename(final)
    fsync_dir(final.parent)
    replace_atomically(final.parent / LATEST, manifest.tag.encode())
    return final


def retention_victims(complete_steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Steps of complete checkpoints to delete: all but the newest `keep_last` (0 keeps all), except
    multiples of `keep_every` (permanent; 0: none). The newest complete one is never deleted."""
    if keep_last <= 0 or not complete_steps:
        return []
    newest_first = sorted(complete_steps, reverse=True)
    kept = set(newest_first[: max(1, keep_last)])
    return [s for s in newest_first if s not in kept and not (keep_every > 0 and s % keep_every == 0)]


def apply_retention(directory: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete old complete checkpoints per the policy and stale partial folders; returns what went.

    Called by rank 0 right after a commit, when no other save is in flight. Folders named like
    checkpoints that are not complete are left alone (they may be worth a look) but never counted."""
    complete = {}
    for folder in checkpoint_folders(directory):
        try:
            manifest = read_manifest(folder)
        except InvalidCheckpoint:
            continue
        complete[manifest.step] = folder
    removed = []
    for step in retention_victims(list(complete), keep_last, keep_every):
        shutil.rmtree(complete[step], ignore_errors=True)
        removed.append(complete[step])
    for partial in stale_partials(directory):
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def check_free_space(directory: Path, needed_bytes: int, keep_last: int) -> None:
    """Refuse to start a save that cannot fit (a half-written checkpoint helps nobody)."""
    free = shutil.disk_usage(directory).free
    if free >= needed_bytes:
        return
    complete = sum(1 for folder in checkpoint_folders(directory) if _is_complete(folder))
    if complete > 1 or keep_last == 0:
        fix = "lower checkpoint.keep_last (older checkpoints are then removed before the save)"
    else:  # only the newest is left, and it stays until the new one is committed
        fix = (
            "the disk must hold the newest complete checkpoint and the one being written: lower "
            "checkpoint.keep_last cannot help"
        )
    raise CheckpointError(
        f"not enough free disk space for a checkpoint in {directory}: about {needed_bytes / 2**30:.2f} GiB "
        f"needed, {free / 2**30:.2f} GiB free, {complete} complete checkpoint(s) kept. Nothing was written. "
        f"Free space there, {fix}, or move run.dir to a larger filesystem, then rerun the same command "
        f"(it resumes from the newest complete checkpoint)"
    )


def _is_complete(folder: Path) -> bool:
    try:
        read_manifest(folder)
    except InvalidCheckpoint:
        return False
    return True
