"""What grows with the model and the number of ranks, measured on this machine (prints JSON).

    python bench/scale.py [--sections memory,reshard,order] [--hidden 1024] [--layers 16] [--output F]

1. memory: the real command (`deepspeed --num_gpus N pretrain/main.py`, CPU accelerator, gloo) on a
   model of a few hundred million parameters, ZeRO-3, fp32, at DP 1, 2 and 4, with and without
   optimizer offload; every rank's own record (run_summary.json `memory`: peak resident set before
   the model, after construction, after the engine, after the first step; pretrain.plan's figure).
   glibc is told to give every allocation of 64 KiB or more its own mmap (MALLOC_MMAP_THRESHOLD_), so
   the resident set follows live tensors. The model-state part (growth over the process before the
   model) must fall roughly as 1/DP.
2. reshard: bytes each rank reads from the layout-free cache when a DP 1 checkpoint resumes at DP 4,
   against the cache's size (pretrain.checkpoint.reshard's own count).
3. order: bytes of the sample order per rank for 1e6, 1e7 and 1e8 samples (pretrain.data's own
   measure), the old per-epoch permutation against the bounded one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
# The ranks run_distributed starts import scale_workers by name.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH")])
)
MIB = 2**20


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=16",
        "model.num_kv_heads=16", "model.ffn_hidden_size=null", "train.seq_len=32", "train.micro_batch_size=1",
        "train.steps=1", "train.eval_interval=0", "train.precision=fp32", "checkpoint.interval=0",
        "checkpoint.save_final=false", "logging.tensorboard=false", "logging.plot=false", "logging.interval=1",
    ]  # fmt: skip


def launch(ranks: int, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One run of the real command; its run_summary.json."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    command = [
        "deepspeed", "--num_gpus", str(ranks), "--master_port", str(29600 + ranks), "pretrain/main.py",
        "--config", "configs/tiny.yaml", f"train.global_batch_size={ranks}", *overrides, f"run.dir={run_dir}",
        "run.overwrite=true",
    ]  # fmt: skip
    started = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
        )
    summary = json.loads((run_dir / "run_summary.json").read_text())
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def memory_case(ranks: int, offload: bool, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    overrides = [
        *model_overrides(args),
        "parallel.zero_stage=3",
        f"parallel.offload_optimizer={'cpu' if offload else 'none'}",
    ]
    summary = launch(ranks, overrides, root / f"memory-dp{ranks}-{'offload' if offload else 'gpu'}")
    per_rank = [
        {
            "rank": r["rank"],
            "baseline_mib": round(r["baseline_bytes"] / MIB),
            "construction_growth_mib": round((r["construction_peak_bytes"] - r["baseline_bytes"]) / MIB),
            "build_growth_mib": round((r["build_peak_bytes"] - r["baseline_bytes"]) / MIB),
            "step_growth_mib": round((r["step_peak_bytes"] - r["baseline_bytes"]) / MIB),
            "planned_mib": round(r["planned_bytes"] / MIB),
        }
        for r in summary["memory"]
    ]
    worst = max(per_rank, key=lambda r: r["step_growth_mib"])
    return {
        "dp": ranks,
        "offload_optimizer": offload,
        "parameters": summary["parameters"],
        "seconds": summary["seconds"],
        "step_growth_mib_worst_rank": worst["step_growth_mib"],
        "construction_growth_mib_worst_rank": max(r["construction_growth_mib"] for r in per_rank),
        "step_bytes_per_parameter_worst_rank": round(
            worst["step_growth_mib"] * MIB / summary["parameters"], 2
        ),
        "per_rank": per_rank,
    }


def memory_section(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cases = []
    for offload in {"both": (False, True), "off": (False,), "on": (True,)}[args.offload]:
        for ranks in (1, 2, 4):
            print(f"memory: ZeRO-3 dp {ranks}, offload {offload} ...", file=sys.stderr, flush=True)
            cases.append(memory_case(ranks, offload, args, root))
    for case in cases:
        one = next(c for c in cases if c["dp"] == 1 and c["offload_optimizer"] == case["offload_optimizer"])
        case["step_growth_vs_dp1"] = round(
            case["step_growth_mib_worst_rank"] / one["step_growth_mib_worst_rank"], 3
        )
        case["ideal_vs_dp1"] = round(1 / case["dp"], 3)
    return {"cases": cases}


def reshard_section(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """A DP 1 ZeRO-1 checkpoint (the real command, one step), resumed at DP 4 under ZeRO-3: what each
    rank reads of the layout-free cache (converted once, beside the checkpoint) against its size."""
    from scale_workers import resume_and_read_cache

    from pretrain.testing import run_distributed

    source = root / "reshard-dp1"
    print("reshard: DP 1 ZeRO-1, one step and a checkpoint ...", file=sys.stderr, flush=True)
    launch(
        1,
        [
            *model_overrides(args),
            "parallel.zero_stage=1",
            "train.global_batch_size=4",
            "checkpoint.save_final=true",
        ],
        source,
    )
    step = max((source / "checkpoints").glob("step*"))
    print("reshard: resumed at DP 4, ZeRO-3 ...", file=sys.stderr, flush=True)
    overrides = [
        *model_overrides(args), "parallel.zero_stage=3", "train.global_batch_size=4", f"checkpoint.resume={step}",
    ]  # fmt: skip
    started = time.perf_counter()
    ranks = run_distributed(resume_and_read_cache, 4, overrides, str(root / "reshard-dp4"), timeout=3000)
    cache = sum(ranks[0]["cache"].values())
    return {
        "from": "DP 1 ZeRO-1 fp32",
        "to": "DP 4 ZeRO-3 fp32",
        "cache_bytes": cache,
        "seconds": round(time.perf_counter() - started, 1),
        "per_rank": [
            {
                "rank": i,
                "read_bytes": sum(r["read"].values()),
                "fraction_of_cache": round(sum(r["read"].values()) / cache, 4),
            }
            for i, r in enumerate(ranks)
        ],
        "all_ranks_vs_cache": round(sum(sum(r["read"].values()) for r in ranks) / cache, 4),
        "before_this_change": "every rank read the whole cache: fraction 1.0 each, 4.0 in all",
    }


def order_section(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Per rank and dataset; a run holds one order per dataset, so a rank's figure is their sum."""
    from pretrain.data.order import order_memory

    cases = []
    for samples in (10**6, 10**7, 10**8):
        for version in (1, 2):
            print(f"order: {samples:.0e} samples, version {version} ...", file=sys.stderr, flush=True)
            cases.append(order_memory(samples, version=version))
    return {
        "cases": cases,
        "versions": {"1": "per-epoch numpy permutation (old)", "2": "keyed Feistel bijection"},
    }


SECTIONS = {"memory": memory_section, "reshard": reshard_section, "order": order_section}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument(
        "--offload", choices=("both", "off", "on"), default="both", help="memory cases to run"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"command": "python bench/scale.py " + " ".join(argv or sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for name in args.sections.split(","):
            result[name] = SECTIONS[name](args, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
