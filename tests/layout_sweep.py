"""Train the tiny preset through the `deepspeed` launcher in every layout of the 3D-parallelism issue
and compare metrics.jsonl with the single-process run of the same config; prints one JSON object.

    python tests/layout_sweep.py [--steps 10] [--output sweep.json]

The pytest suite checks the same layouts faster through `run_distributed` on a smaller model
(tests/test_parallel_layouts.py) and the launcher for the 3D layout; this is the user's own command
for all of them. Exit code 1 when a layout's loss or grad norm leaves the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RTOL = 2e-5  # the tolerance of tests/test_parallel_layouts.py, with its reasoning there


def run(processes: int, overrides: list[str], run_dir: Path, steps: int, port: int) -> dict[int, dict]:
    common = [
        "pretrain/main.py", "--config", "configs/tiny.yaml", f"train.steps={steps}", "logging.interval=1",
        "train.eval_interval=0", "checkpoint.save_final=false", "logging.plot=false",
        "logging.tensorboard=false", f"run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    command = [deepspeed, "--num_gpus", str(processes), "--master_port", str(port), *common]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from parallel_checks import ISSUE_LAYOUTS
    from pretrain.parallel.distributed import free_port

    out: dict[str, dict] = {"steps": args.steps, "rtol": RTOL, "layouts": {}}
    references: dict[tuple[str, ...], dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (processes, layout, model) in ISSUE_LAYOUTS.items():
            if tuple(model) not in references:
                references[tuple(model)] = run(
                    1, model, Path(tmp) / f"ref{len(references)}", args.steps, free_port()
                )
            reference = references[tuple(model)]
            ours = run(processes, [*layout, *model], Path(tmp) / name, args.steps, free_port())
            loss = max(relative(ours[s]["loss"], r["loss"]) for s, r in reference.items())
            grad = max(relative(ours[s]["grad_norm"], r["grad_norm"]) for s, r in reference.items())
            out["layouts"][name] = {
                "command": f"deepspeed --num_gpus {processes} pretrain/main.py --config configs/tiny.yaml "
                + " ".join([*layout, *model]),
                "max_rel_loss_diff": loss,
                "max_rel_grad_norm_diff": grad,
                "final_loss": ours[args.steps]["loss"],
                "ok": loss <= RTOL and grad <= RTOL,
            }
            print(f"{name}: loss {loss:.1e}, grad norm {grad:.1e}", file=sys.stderr, flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if all(v["ok"] for v in out["layouts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
