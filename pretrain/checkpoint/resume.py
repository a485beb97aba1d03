"""Choosing the checkpoint to resume from, and checking that it may be resumed with this config.

`checkpoint.resume=auto` takes the newest complete checkpoint of run.dir; a folder that turns out
to be incomplete or corrupt is reported and the next older one is tried. An explicit path must be
usable itself (no silent substitute). Every rank takes part in the checks: rank 0 reads the
manifest and file sizes, every rank verifies the checksums of its share of the files, and all
agree on the verdict, so all ranks resume from the same folder or none does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.manifest import (
    Manifest,
    check_checksums,
    check_sizes,
    checkpoint_folders,
    read_manifest,
    split_for_ranks,
    step_of,
)
from pretrain.checkpoint.state import STATE_FILE, read_state_document
from pretrain.config import RESUME_GUARDED_KEYS, Config, ConfigError, load_config
from pretrain.errors import CheckpointError, InvalidCheckpoint

CONFIG_FILE = "config.yaml"


@dataclass
class ResumePoint:
    folder: Path
    manifest: Manifest
    state: dict[str, Any]  # state.json (pretrain.checkpoint.state): the parts, layout, provenance
    config: Config  # the resolved config the checkpoint was saved with

    @property
    def step(self) -> int:
        return self.manifest.step


def _candidates(cfg: Config) -> tuple[list[Path], bool]:
    """(folders to try, newest first; whether the user named one explicitly)."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return [], False
    if mode == "auto":
        return checkpoint_folders(Path(cfg.run.dir) / "checkpoints"), False
    path = Path(mode)
    if step_of(path) is not None or (path / "manifest.json").is_file():
        return [path], True
    for directory in (path / "checkpoints", path):
        folders = checkpoint_folders(directory)
        if folders:
            return folders, False
    raise CheckpointError(
        f"checkpoint.resume={mode}: no checkpoint there (expected a stepNNNNNNNN folder, or a run or checkpoints "
        f"folder holding some); use checkpoint.resume=auto to continue run.dir, or none to start fresh"
    )


def select_resume_point(
    cfg: Config, agreement: StepAgreement, rank: int, world_size: int, log: Callable[[str], None]
) -> ResumePoint | None:
    """The checkpoint this run continues from, or None for a fresh start; every rank gets the same."""
    folders, explicit = _candidates(cfg)
    problems = []
    for folder in folders:
        manifest, problem = _validate(
            folder, cfg.checkpoint.verify == "checksum", agreement, rank, world_size
        )
        if problem is None:
            assert manifest is not None
            return read_point(folder, manifest)
        if explicit:
            raise CheckpointError(
                f"checkpoint.resume={cfg.checkpoint.resume}: {folder} is not a complete checkpoint: {problem}; "
                f"name an earlier one, or use checkpoint.resume=auto"
            )
        log(f"skipping {folder}: {problem}; trying the previous checkpoint")
        problems.append(f"{folder.name}: {problem}")
    if folders:
        # Only a commit gives a folder its final name, so each of these was complete once: training
        # from step 0 over them would silently throw away the run (and the evidence of the damage).
        raise CheckpointError(
            f"every checkpoint in {folders[0].parent} is damaged ({'; '.join(problems)}); nothing was changed. "
            f"Restore the files, resume a good copy with checkpoint.resume=<path>, or start over from step 0 with "
            f"checkpoint.resume=none run.overwrite=true (which deletes them: move {folders[0].parent} aside first "
            f"to keep them)"
        )
    return None


def _validate(
    folder: Path, checksums: bool, agreement: StepAgreement, rank: int, world_size: int
) -> tuple[Manifest | None, str | None]:
    manifest, problem = None, None
    if rank == 0:
        try:
            manifest = read_manifest(folder)
            check_sizes(folder, manifest)
            if STATE_FILE not in manifest.files or CONFIG_FILE not in manifest.files:
                raise InvalidCheckpoint(folder, f"it has no {STATE_FILE} or {CONFIG_FILE}")
        except InvalidCheckpoint as e:
            problem = e.reason
    manifest, problem = agreement.broadcast((manifest, problem))
    if problem is None and checksums:
        assert manifest is not None
        mine = None
        try:
            check_checksums(folder, manifest, split_for_ranks(manifest, world_size)[rank])
        except (InvalidCheckpoint, OSError) as e:
            mine = e.reason if isinstance(e, InvalidCheckpoint) else repr(e)
        found = [p for p in agreement.gather(mine) if p]
        problem = found[0] if found else None
    return manifest, problem


def read_point(folder: Path, manifest: Manifest | None = None) -> ResumePoint:
    """A checkpoint folder already known to be complete, with its state and config read."""
    manifest = manifest or read_manifest(folder)
    state = read_state_document(folder)
    try:
        config = load_config(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} (the checkpoint's config) is not valid here: {e}"
        ) from e
    return ResumePoint(folder, manifest, state, config)


# ---------------------------------------------------------------------------------------------
# What may change between the checkpoint and the resumed run


def _flat(cfg: Config) -> dict[str, Any]:
    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): node}

    return walk(cfg.to_dict(), "")


def resume_changes(
    saved: Config, current: Config, saved_data: dict[str, Any], current_data: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """(problems that stop the resume, each with its fix; notes on harmless changes)."""
    from pretrain.weights.consolidated import architecture_differences

    problems = [
        f"{p} (a resumed run keeps its model; start a new run.dir to train another)"
        for p in architecture_differences(saved.model, current.model)
    ]
    allowed = set(current.checkpoint.allow_changes)
    before, after = _flat(saved), _flat(current)
    notes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith("model.") or key in (
            "checkpoint.resume",
            "checkpoint.allow_changes",
            "run.overwrite",
        ):
            continue
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key in RESUME_GUARDED_KEYS and key not in allowed:
            problems.append(
                f"{key} was {old!r} in the checkpoint and is {new!r} now: the following steps would see other data. "
                f"Set it back, or accept the change with checkpoint.allow_changes='[{key}]'"
            )
        else:
            notes.append(f"{key}: {old!r} -> {new!r}")
    if saved_data != current_data and "data.paths" not in allowed:
        problems.append(
            f"the training data changed since the checkpoint (datasets, tokenizer or manifests: saved {saved_data}, "
            f"now {current_data}); use the same prepared data, or accept it with checkpoint.allow_changes='[data.paths]'"
        )
    return problems, notes
