import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# PRETRAIN_TEST_GPU=1 (`make check-gpu`): only the tests marked gpu, on the accelerator DeepSpeed
# finds (CUDA, NCCL). Otherwise tests run on CPU with gloo whatever the machine has.
GPU_MODE = os.environ.get("PRETRAIN_TEST_GPU") == "1"
if not GPU_MODE:
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


# ----- GPU mode: `@pytest.mark.gpu` tests run only under PRETRAIN_TEST_GPU=1, `@pytest.mark.gpu(gpus=2)`
# ones only where at least that many GPUs are visible; everywhere else they are skipped with the reason.

NEEDS_CUDA = "needs CUDA (run make check-gpu on a GPU node)"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not GPU_MODE:
        skip = pytest.mark.skip(reason=f"GPU test: {NEEDS_CUDA}; the CPU suite forces DS_ACCELERATOR=cpu")
        for item in gpu_items:
            item.add_marker(skip)
        return
    others = [item for item in items if not item.get_closest_marker("gpu")]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = gpu_items
    import torch  # only here: the CPU suite never initialises CUDA in the test runner

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in gpu_items:
        needed = item.get_closest_marker("gpu").kwargs.get("gpus", 1)
        if visible == 0:
            item.add_marker(pytest.mark.skip(reason=NEEDS_CUDA))
        elif visible < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed}+ GPUs ({visible} visible)"))
