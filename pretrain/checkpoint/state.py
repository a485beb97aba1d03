"""What survives a restart: named `Stateful` parts, saved and restored in one place.

Every part implements `state_dict()` / `load_state_dict(state)`. The run registers its parts once,
in the order they are restored (`RunState.register`); a checkpoint is then

- DeepSpeed's own files: the module and optimizer state, written by the engine (so DeepSpeed's
  tools keep working on our checkpoints);
- `state.json`, written by rank 0: one entry per shared part (the same on every rank: the loop's
  position, the data position, the LR schedule's position, DeepSpeed's counters, callback state),
  plus what describes the checkpoint itself (layout, world size, provenance);
- one file per rank for each per-rank part (`<name>/rank_NNNNN.safetensors`: the RNG states).

A rollback after a non-finite step restores every part except those registered with
`rolled_back=False`: the run's history (how many non-finite steps it met), which only grows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pretrain.errors import CheckpointError

STATE_FILE = "state.json"
STATE_FORMAT = "pretrain-state-v2"
_OLDER_FORMATS = ("pretrain-state-v1",)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class PerRankStateful(Stateful, Protocol):
    """A part each rank keeps its own of; with no saved state for this rank (another layout or world
    size) it starts fresh, derived from the step resumed."""

    def start_fresh(self, step: int) -> None: ...


@dataclass
class Part:
    obj: Stateful
    per_rank: bool = False
    rolled_back: bool = True
    required: bool = True  # a checkpoint without it cannot be resumed (else the part starts fresh)


@dataclass
class RunState:
    """The run's parts by name, in restore order."""

    parts: dict[str, Part] = field(default_factory=dict)

    def register(
        self,
        name: str,
        obj: Stateful,
        *,
        per_rank: bool = False,
        rolled_back: bool = True,
        required: bool = True,
    ) -> None:
        if name in self.parts:
            raise ValueError(f"a part named {name!r} is registered already")
        if per_rank and not isinstance(obj, PerRankStateful):
            raise TypeError(f"per-rank part {name!r} must implement start_fresh(step)")
        self.parts[name] = Part(obj, per_rank, rolled_back, required)

    def shared_state(self) -> dict[str, dict[str, Any]]:
        return {name: part.obj.state_dict() for name, part in self.parts.items() if not part.per_rank}

    def rank_state(self) -> dict[str, dict[str, Any]]:
        return {name: part.obj.state_dict() for name, part in self.parts.items() if part.per_rank}

    def per_rank_names(self) -> list[str]:
        return [name for name, part in self.parts.items() if part.per_rank]

    def load(
        self,
        shared: dict[str, dict[str, Any]],
        rank_states: dict[str, dict[str, Any]],
        step: int,
        rollback: bool = False,
    ) -> None:
        """Restore every part from a checkpoint of `step`; a per-rank part missing from `rank_states`
        starts fresh. A rollback leaves the parts registered with rolled_back=False as they are."""
        missing = [n for n, p in self.parts.items() if p.required and not p.per_rank and n not in shared]
        if missing:
            raise CheckpointError(f"the checkpoint's {STATE_FILE} has no {', '.join(missing)}")
        for name, part in self.parts.items():
            if rollback and not part.rolled_back:
                continue
            if part.per_rank:
                saved = rank_states.get(name)
                if saved is None:
                    part.obj.start_fresh(step)  # type: ignore[attr-defined]
                else:
                    part.obj.load_state_dict(saved)
            elif name in shared:
                part.obj.load_state_dict(shared[name])


def state_document(
    step: int, parts: dict[str, Any], layout: dict[str, Any], world_size: int, provenance: dict[str, Any]
) -> dict[str, Any]:
    """The content of state.json."""
    return {
        "format": STATE_FORMAT,
        "step": step,
        "parts": parts,
        "layout": layout,
        "world_size": world_size,
        "provenance": provenance,
        "saved_at": time.time(),
    }


def read_state_document(folder: Path) -> dict[str, Any]:
    """state.json of `folder`, in the current format (older ones upgraded as they are read)."""
    path = folder / STATE_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); resume an earlier checkpoint") from e
    found = document.get("format") if isinstance(document, dict) else None
    if found in _OLDER_FORMATS:
        return _upgrade_v1(document)
    if found != STATE_FORMAT:
        raise CheckpointError(f"{path} has format {found!r}, not {STATE_FORMAT!r}")
    return document


def _upgrade_v1(document: dict[str, Any]) -> dict[str, Any]:
    """v1 kept the loop and data state together, torch LambdaLR's state and the counters apart."""
    loop = dict(document["trainer"])
    data = loop.pop("data")
    parts = {
        "engine": {**document["engine"], "adam_step": document["adam_step"]},
        "lr_schedule": {"position": document["lr_scheduler"]["last_epoch"]},
        "loop": loop,
        "data": data,
    }
    keep = ("step", "layout", "world_size", "provenance", "saved_at")
    return {"format": STATE_FORMAT, "parts": parts, **{k: document[k] for k in keep}}


# ---------------------------------------------------------------------------------------------
# Per-rank parts on disk: tensors as safetensors tensors, everything else as JSON in its metadata


def rank_file(name: str, rank: int) -> str:
    return f"{name}/rank_{rank:05d}.safetensors"


def encode_rank_state(state: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {k: json.dumps(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return save(tensors, metadata=metadata)


def decode_rank_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    state: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            state[key] = f.get_tensor(key)
        for key, value in (f.metadata() or {}).items():
            state[key] = json.loads(value)
    return state
