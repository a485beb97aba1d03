import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# Tests run on CPU with gloo whatever the machine has.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds a small communication helper into the torch extensions cache; a cache shared by
# several virtual environments (one per checkout) is rebuilt on every launch. One cache per venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


_SHM_BEFORE = pytest.StashKey[set]()


def _shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers of this user in /dev/shm (see deepspeed_compat)."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith(prefix)} if shm.is_dir() else set()


def pytest_sessionstart(session):
    session.config.stash[_SHM_BEFORE] = _shm_buffers()


def pytest_sessionfinish(session, exitstatus):
    """The suite must leave /dev/shm as it found it: a leaked buffer per rank per run once filled a
    24 GB machine's memory within an hour of tests."""
    leaked = sorted(_shm_buffers() - session.config.stash.get(_SHM_BEFORE, set()))
    if leaked:
        print(
            f"\nFAILED: the tests left {len(leaked)} shared-memory buffers in /dev/shm: {', '.join(leaked)}"
        )
        session.exitstatus = 1
