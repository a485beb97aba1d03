"""Runs on the GPU for tests/test_gpu.py, each in a process of its own on the real accelerator.

`run_on_gpus(NAME, *args, gpus=N)` starts `python tests/gpu_runs.py NAME ARGS OUT` (one GPU: a world
of one) or the same under the deepspeed launcher (N GPUs over NCCL). Every rank joins the process
group, runs `NAME(*args)` (from `RUNS`) and writes its JSON result to OUT/rankR.json. Never in the test
runner: DeepSpeed fixes its accelerator at import, and CUDA cannot be used by a process forked from
one that has started it, so `pretrain.testing.run_distributed` (CPU, gloo) is no way to reach it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # this worktree's pretrain, not the one an editable install points to
    sys.path.insert(0, str(REPO))

from parallel_checks import replica_check_after_drift  # noqa: E402
from training_runs import SMALL, train_and_read_metrics  # noqa: E402

_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class GpuRunError(AssertionError):
    pass


def gpu_env(**extra: str) -> dict[str, str]:
    """A GPU run's environment: DeepSpeed detects CUDA itself, no launcher variables of an enclosing
    job leak in, and cuBLAS keeps to its deterministic workspace (the exact-resume test needs it)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    if env.get("DS_ACCELERATOR") != "cuda":
        env.pop("DS_ACCELERATOR", None)
    return {**env, "PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", **extra}


def cpu_env() -> dict[str, str]:
    """The same process on the CPU (DeepSpeed's CPU accelerator, gloo), the GPUs hidden."""
    return gpu_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")


def launcher(gpus: int, port: int) -> list[str]:
    """The `deepspeed` command on this interpreter (a bare GPU image may have no `deepspeed` script)."""
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*runner, "--num_gpus", str(gpus), "--master_port", str(port)]


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise GpuRunError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def run_on_gpus(name: str, *args: Any, gpus: int = 1, timeout: float = 600) -> list[Any]:
    """`RUNS[name](*args)` on `gpus` ranks, one GPU each; each rank's result, in rank order."""
    from pretrain.parallel.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        script = [str(Path(__file__).resolve()), name, json.dumps(args), out]
        if gpus == 1:
            command = [sys.executable, *script]
        else:
            command = [*launcher(gpus, free_port()), "--no_local_rank", *script]
        run(command, gpu_env(), timeout)
        return [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in range(gpus)]


# ----- what the ranks run


def _trainer(overrides: list[str], run_dir: str) -> Any:
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [*SMALL, *overrides, f"run.dir={run_dir}"], dist.get_world_size()
    )
    return build_trainer(cfg, init_distributed())


def _records(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _digest(tensors: Any) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def engine_facts(trainer: Any) -> dict[str, Any]:
    """What the engine really runs on: device, backend, the torch optimizer inside DeepSpeed's wrapper
    (fused or not, and where the tensors it steps live)."""
    import torch.distributed as dist

    from pretrain import deepspeed_compat as compat

    base = compat.base_optimizer(trainer.engine.ds.optimizer)
    return {
        "device": str(trainer.engine.device),
        "backend": dist.get_backend(),
        "fused_adamw": base.defaults.get("fused"),
        "optimizer_devices": sorted({str(p.device) for g in base.param_groups for p in g["params"]}),
    }


def train_with_facts(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """Train; the metrics, the engine's facts, the precision it chose and the graphs torch.compile built."""
    from torch._dynamo.utils import counters

    trainer = _trainer(overrides, run_dir)
    facts = engine_facts(trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
    summary = json.loads((Path(run_dir) / "run_summary.json").read_text())
    graphs = counters["stats"]["unique_graphs"]
    return {**facts, "precision": summary["precision"], "records": _records(run_dir), "graphs": graphs}


def train_with_cuda_noise(overrides: list[str], run_dir: str, scramble_cuda_rng: bool) -> dict[str, Any]:
    """Train with noise from the CUDA generator added to the final norm's output, so every loss depends
    on the CUDA RNG stream; with `scramble_cuda_rng` that generator is reseeded after the build (as if a
    resume had not restored it). Deterministic kernels and SDPA's math backend: flash attention's
    backward accumulates dQ with atomics, which would make two runs of one step differ in the last bit
    whatever the checkpoint held. Returns the metrics and digests of the final weights and CUDA RNG."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    # Not NaN-filled: DeepSpeed's flat buffers keep the padding it allocated, as in any training run.
    torch.utils.deterministic.fill_uninitialized_memory = False
    with sdpa_kernel(SDPBackend.MATH):
        trainer = _trainer(overrides, run_dir)
        if scramble_cuda_rng:
            torch.cuda.manual_seed(987_654_321)
        trainer.engine.module.norm.register_forward_hook(
            lambda module, args, out: out + 1e-2 * torch.randn_like(out)
        )
        try:
            trainer.fit()
        finally:
            trainer.close()
    return {
        "records": _records(run_dir),
        "weights": _digest(trainer.engine.module.parameters()),
        "cuda_rng": _digest([torch.cuda.get_rng_state()]),
    }


def save_sync_then_async(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """One step in, the same state saved three times: synchronously (step 1), asynchronously into new
    host buffers (step 2) and into the reused ones (step 3). The time each save() held the training
    thread, the pool's pinned and pageable bytes, and the tensors of step 3 against step 1."""
    import torch

    saving = ["checkpoint.interval=0", "checkpoint.save_final=false", "checkpoint.keep_last=0"]
    trainer = _trainer([*overrides, *saving], run_dir)
    trainer.train_step(trainer.train_batches.next_step())  # every optimizer tensor exists from here
    store = next(c.store for c in trainer.callbacks if hasattr(c, "store"))
    held_s = {}
    for step, mode in ((1, "sync"), (2, "async_cold"), (3, "async")):
        trainer.state.step = step
        store.cfg.checkpoint.async_save = mode != "sync"
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's work is not the save's
        start = time.perf_counter()
        store.save(trainer.run_state, step)
        held_s[mode] = time.perf_counter() - start
        outcome = store.wait()
        assert outcome is not None and outcome.ok, outcome
    folders = [store.directory / f"step{step:08d}" for step in (1, 3)]
    compared, mismatches = compare_checkpoint_tensors(*folders)
    result = {
        "held_s": held_s,
        "stall_over_sync": held_s["async"] / held_s["sync"],
        "buffers": store.writer.buffers.bytes_held(),
        "module_bytes": sum(p.nbytes for p in trainer.engine.module.parameters()),
        "module_on_cuda": all(p.is_cuda for p in trainer.engine.module.parameters()),
        "compared": compared,
        "mismatches": mismatches,
    }
    trainer.close()
    return result


def compare_checkpoint_tensors(ours: Path, reference: Path) -> tuple[int, list[str]]:
    """Every tensor in the .pt files of `reference` against `ours`, bitwise: (how many, which differ).
    Only tensors: the files also record the step they were saved at."""
    import torch

    compared, mismatches = 0, []
    for path in sorted(reference.rglob("*.pt")):
        name = str(path.relative_to(reference))
        expected = _tensor_leaves(torch.load(path, map_location="cpu", weights_only=False))
        actual = _tensor_leaves(torch.load(ours / name, map_location="cpu", weights_only=False))
        if expected.keys() != actual.keys():
            mismatches.append(f"{name}: tensors {sorted(expected.keys() ^ actual.keys())[:5]} in one only")
        for key in expected.keys() & actual.keys():
            compared += 1
            a, b = actual[key], expected[key]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                mismatches.append(f"{name}: {key}")
    return compared, mismatches


def _tensor_leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: v for key, value in items for k, v in _tensor_leaves(value, f"{prefix}/{key}").items()}


def fingerprints_over_nccl() -> dict[str, Any]:
    """The replica checker's all-gather on a one-rank NCCL world (the checker itself skips a group of
    one, so this calls the gather directly): where the result lands and whether it is this rank's."""
    import torch
    import torch.distributed as dist

    from parallel_checks import MODEL
    from pretrain.model import Transformer
    from pretrain.parallel.replicas import gathered_fingerprints

    params = list(Transformer(MODEL, seed=0).cuda().named_parameters())
    gathered = gathered_fingerprints(params, dist.group.WORLD)
    local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for _, p in params])
    return {
        "backend": dist.get_backend(),
        "shape": list(gathered.shape),
        "device": str(gathered.device),
        "equal": torch.equal(gathered[0], local.cpu()),
    }


RUNS = {
    fn.__name__: fn
    for fn in (
        train_and_read_metrics,
        replica_check_after_drift,
        train_with_facts,
        train_with_cuda_noise,
        save_sync_then_async,
        fingerprints_over_nccl,
    )
}


def main(name: str, args: str, out: str) -> int:
    from pretrain.parallel.distributed import init_distributed

    try:
        info = init_distributed()
        result = RUNS[name](*json.loads(args))
        (Path(out) / f"rank{info.rank}.json").write_text(json.dumps(result))
        return 0
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    from pretrain.main import exit_process

    exit_process(main(*sys.argv[1:4]))
