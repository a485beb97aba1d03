"""Crash test: SIGKILL one rank of a 2-process `deepspeed pretrain/main.py` run at random moments
while it saves a checkpoint after every step; restart; repeat. Prints one JSON object.

    python tests/crash_saves.py --trials 20 [--seed 0] [--output crash.json]

Each trial starts the same command in the same run directory (as a requeued job would), lets it
resume and train for a random 0-4 s, and kills a random rank with SIGKILL (the launcher then takes
the other one down). Checked every trial:
  - the run resumed from the newest checkpoint that was complete (manifest, sizes and checksums)
    when it started, and says so;
  - no complete checkpoint was lost: every complete one from before the trial is still complete
    after it, unless retention deleted it (keep_last newer complete ones exist), which also means
    the newest complete one is never lost.
Exit code 1 if any trial breaks either rule. tests/test_checkpoint_crash.py runs a few trials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP_LAST = 4
TRAINING = re.compile(r"step +\d+/\d+ \|")  # a console line of a trained step


def complete_checkpoints(run_dir: Path) -> dict[int, str]:
    """step -> folder name of every complete checkpoint (manifest, sizes, checksums all good)."""
    from pretrain.checkpoint.manifest import check_checksums, check_sizes, checkpoint_folders, read_manifest
    from pretrain.errors import InvalidCheckpoint

    found = {}
    for folder in checkpoint_folders(run_dir / "checkpoints"):
        try:
            manifest = read_manifest(folder)
            check_sizes(folder, manifest)
            check_checksums(folder, manifest, manifest.files)
        except (InvalidCheckpoint, OSError):
            continue
        found[manifest.step] = folder.name
    return found


def rank_pids(launcher_pid: int) -> list[int]:
    import psutil

    ranks = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "pretrain/main.py" in cmdline and "deepspeed.launcher" not in cmdline:
            ranks.append(child.pid)
    return ranks


def trial(run_dir: Path, rng: random.Random, log: Path) -> dict:
    from pretrain.parallel.distributed import free_port
    from training_runs import SMALL

    before = complete_checkpoints(run_dir)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    overrides = [
        *SMALL, "train.steps=100000", "checkpoint.interval=1", f"checkpoint.keep_last={KEEP_LAST}",
        "logging.interval=1", f"run.dir={run_dir}",
    ]  # fmt: skip
    command = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "pretrain/main.py",
               "--config", "configs/tiny.yaml", *overrides]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 300
        while not TRAINING.search(log.read_text()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # until training (after the resume) runs
        time.sleep(rng.uniform(0.0, 4.0))
        ranks = rank_pids(proc.pid)
        victim = rng.choice(ranks) if ranks else None
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
        during_save = any((run_dir / "checkpoints").glob(".step*.partial"))  # a save was being written
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in ranks:  # nothing of this trial may still write when the next one starts
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    after = complete_checkpoints(run_dir)
    newest = max(before) if before else None
    resumed = re.search(r"resumed from \S+/step(\d+) ", text)
    lost = [
        s for s in before
        if s not in after and not (len([a for a in after if a > s]) >= KEEP_LAST)
    ]  # fmt: skip
    problems = []
    if lost:  # includes the newest complete one: retention deletes it only once keep_last newer exist
        problems.append(f"complete checkpoints lost outside retention: {lost}")
    if newest is not None and (resumed is None or int(resumed.group(1)) != newest):
        problems.append(
            f"did not resume from step {newest}: {resumed.group(0) if resumed else 'no resume line'}"
        )
    return {
        "complete_before": sorted(before),
        "complete_after": sorted(after),
        "resumed_from": int(resumed.group(1)) if resumed else None,
        "killed": "rank" if victim else "nothing (training had not started)",
        "during_save": during_save,
        "saves_committed": len([s for s in after if s not in before]),
        "problems": problems,
    }


def run_trials(trials: int, seed: int, run_dir: Path) -> dict:
    for path in (str(REPO), str(REPO / "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    rng = random.Random(seed)
    results = []
    for index in range(trials):
        result = trial(run_dir, rng, run_dir.parent / f"trial{index:03d}.log")
        results.append(result)
        print(f"trial {index}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return {
        "trials": trials,
        "seed": seed,
        "keep_last": KEEP_LAST,
        "resumes_checked": sum(r["resumed_from"] is not None for r in results),
        "saves_committed": sum(r["saves_committed"] for r in results),
        "kills_during_a_save": sum(r["during_save"] for r in results),
        "failures": [dict(trial=i, problems=r["problems"]) for i, r in enumerate(results) if r["problems"]],
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = run_trials(args.trials, args.seed, Path(tmp) / "run")
    text = json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
