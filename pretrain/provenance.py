"""Where a run or an exported file came from: the framework's version, the code's commit, the software."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pretrain


def code_version() -> str:
    """The git commit of the framework's checkout, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """The versions a run records with its checkpoints (and the pre-flight check compares)."""
    import deepspeed
    import torch

    return {
        "pretrain": pretrain.__version__,
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
    }
