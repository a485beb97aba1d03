"""What a user points a conversion at: a run directory, its checkpoints directory, one checkpoint, or
consolidated weights (a to-fp32 / from-hf output). Resolved to the weights and the config they need.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config, ConfigError, ModelConfig, load_config
from pretrain.errors import ConversionError

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"  # DeepSpeed's pointer: the tag of the last save that finished on every rank


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory of the newest complete checkpoint under `path` (a run directory, its
    checkpoints directory, or a step directory itself).

    Complete means a valid manifest with every listed file at its recorded size (the trainer's
    commit protocol, pretrain.checkpoint); checkpoints written by plain DeepSpeed, without
    manifests, fall back to DeepSpeed's `latest` pointer, which it writes after every rank saved.
    """
    from pretrain.checkpoint.manifest import check_sizes, checkpoint_folders, read_manifest
    from pretrain.errors import InvalidCheckpoint

    path = Path(path)
    if not path.exists():
        raise ConversionError(
            f"{path} does not exist; give a run directory, its checkpoints/ or a checkpoint"
        )
    if _is_step_dir(path):
        if (path / "manifest.json").is_file():
            try:
                check_sizes(path, read_manifest(path))
            except InvalidCheckpoint as e:
                raise ConversionError(f"{e}; give an earlier checkpoint") from e
        return path
    checkpoints = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    folders = checkpoint_folders(checkpoints)
    for folder in folders:
        try:
            check_sizes(folder, read_manifest(folder))
        except InvalidCheckpoint:
            continue
        return folder
    latest = checkpoints / LATEST_FILE
    if any((f / "manifest.json").is_file() for f in folders) or not latest.is_file():
        steps = [p.name for p in folders if _is_step_dir(p)]
        hint = f"; it holds {', '.join(steps)}, none complete" if steps else ""
        raise ConversionError(f"{checkpoints} holds no complete checkpoint{hint}")
    step = checkpoints / latest.read_text().strip()
    if not _is_step_dir(step):
        raise ConversionError(
            f"{latest} names {step.name}, which holds no checkpoint files; give a step directory"
        )
    return step


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def run_config(step_dir: Path, config_path: str | Path | None = None) -> Config:
    """The config the checkpoint was trained with: `config_path`, else the run directory's config.yaml
    (two levels up from the step directory)."""
    candidate = Path(config_path) if config_path else step_dir.parent.parent / "config.yaml"
    if not candidate.is_file():
        raise ConversionError(
            f"no run config at {candidate}; pass the config the checkpoint was trained with as --config"
        )
    try:
        return load_config(candidate)
    except ConfigError as e:
        raise ConversionError(f"{candidate}: {e}") from e


@dataclass
class Weights:
    """A model's full fp32 weights, available as a stream of (plain name, unpadded tensor): the
    parameters and persistent buffers (`pretrain.model.names.stored_shapes`)."""

    model: ModelConfig
    provenance: dict[str, Any]
    config: Config | None = None  # the training config, when the weights come from a training run
    run_dir: Path | None = None
    _open: Any = field(default=None, repr=False)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._open()


def open_weights(path: str | Path, config_path: str | Path | None = None) -> Weights:
    """Weights from a training checkpoint (any layout, newest complete one under a run directory) or
    from a consolidated safetensors file or folder."""
    import pretrain
    from pretrain.weights.consolidated import WEIGHTS_FILE, ConsolidatedWeights

    path = Path(path)
    if path.suffix == ".safetensors" or (path / WEIGHTS_FILE).is_file():
        try:
            consolidated = ConsolidatedWeights(path)
        except ConfigError as e:
            raise ConversionError(str(e)) from e
        run_dir = path if path.is_dir() else None
        return Weights(consolidated.model_config, consolidated.provenance, None, run_dir, consolidated.items)

    from pretrain.checkpoint.deepspeed_reader import DeepSpeedCheckpoint

    step_dir = resolve_checkpoint(path)
    cfg = run_config(step_dir, config_path)
    checkpoint = DeepSpeedCheckpoint(step_dir, cfg)
    run_dir = step_dir.parent.parent
    summary_file = run_dir / "run_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    provenance = {
        "framework": f"pretrain {pretrain.__version__}",
        "trained_with_code": summary.get("versions", {}).get("code", "unknown"),
        "checkpoint": str(step_dir),
        "step": checkpoint.step,
        "tokens_seen": checkpoint.tokens_seen,
        "layout": checkpoint.layout.describe(),
        "precision": summary.get("precision", cfg.train.precision),
        "weights": checkpoint.source,
    }
    return Weights(cfg.model, provenance, cfg, run_dir, checkpoint.stored_tensors)
