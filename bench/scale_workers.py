"""Rank functions for bench/scale.py, importable by the processes pretrain.testing.run_distributed starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def resume_and_read_cache(overrides: list[str], run_dir: str) -> dict[str, Any] | None:
    """Build the real trainer, which resumes (resharded) from checkpoint.resume; this rank's bytes read
    from the layout-free cache, by kind, and the cache's size."""
    import torch.distributed as dist

    from pretrain.checkpoint.reshard import last_cache_reads
    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [*overrides, f"run.dir={run_dir}"], world_size=dist.get_world_size()
    )
    trainer = build_trainer(cfg, init_distributed())
    trainer.close()
    reads = last_cache_reads()
    return None if reads is None else reads.as_dict()
