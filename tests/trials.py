"""Adversarial trials, through the user's own commands: what a new user (or a cluster) does to a run.
Prints one JSON object per trial, then a table for docs/CHECKPOINTS.md ("What we tried").

    python tests/trials.py [--repeats 100] [--only NAME ...] [--output trials.json]

Each trial runs `deepspeed pretrain/main.py` (2 CPU ranks) or `python pretrain/main.py` on the
small model of tests/training_runs.py in a fresh directory and checks the exit code, the message
and what is left on disk. `--repeats` is how often the finished-run trial is repeated (a failure
at exit in 3% of runs needs about 100 to be seen). Exit code 1 if any trial did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_runs import REPO, SMALL

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
BIN = Path(sys.executable).parent
Outcome = tuple[bool, str]  # (held, what was seen)


def main_command(
    run_dir: Path, *overrides: str, ranks: int = 2, config: str = "configs/tiny.yaml"
) -> list[str]:
    main = ["pretrain/main.py", "--config", config, *SMALL, *overrides, f"run.dir={run_dir}"]
    if ranks == 1:
        return [sys.executable, *main]
    from pretrain.parallel.distributed import free_port

    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *main]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for_records(run_dir: Path, count: int, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    path, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while not path.is_file() or len(path.read_text().splitlines()) < count:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(
                f"the run ended or stalled before {count} records: {proc.stderr.read()[-2000:]}"
            )  # type: ignore[union-attr]
        time.sleep(0.2)


def saved_run(root: Path, steps: int = 4) -> Path:
    """A finished 1-process run with checkpoints every 2 steps, all kept."""
    run_dir = root / "run"
    done = run(main_command(run_dir, f"train.steps={steps}", "checkpoint.interval=2", "checkpoint.keep_last=0",
                            "checkpoint.save_final=true", ranks=1))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` by content (a file written back with the same bytes is unchanged)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def clean(result: subprocess.CompletedProcess[str], code: int, text: str) -> Outcome:
    held = result.returncode == code and text in result.stderr and "Traceback" not in result.stderr
    return held, f"exit {result.returncode}" + ("" if held else f": {result.stderr[-600:]!r}")


# ----- the trials


def finished_run_exits_0(root: Path) -> Outcome:
    result = run(main_command(root / "run", "train.steps=4", "checkpoint.interval=2"))
    aborted = "terminate called" in result.stderr
    return result.returncode == 0 and not aborted, f"exit {result.returncode}" + (
        ", SIGABRT" if aborted else ""
    )


def second_start_on_a_live_run_dir(root: Path) -> Outcome:
    run_dir = root / "run"
    first = start(main_command(run_dir, "train.steps=100000", ranks=1))
    try:
        wait_for_records(run_dir, 2, first)
        second = run(main_command(run_dir, "train.steps=100000", "optim.lr=1e-4", ranks=1))
        held, seen = clean(second, 2, "is in use by another run")
        return held and first.poll() is None, seen + ("" if first.poll() is None else "; the first run died")
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(300)


def rerun_after_sigkill_takes_over_the_lock(root: Path) -> Outcome:
    run_dir = root / "run"
    first = start(main_command(run_dir, "train.steps=100000", "checkpoint.interval=2"))
    wait_for_records(run_dir, 3, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    again = run(main_command(run_dir, "train.steps=6", "checkpoint.interval=2"))
    held = again.returncode == 0 and "took over the stale lock" in again.stderr + again.stdout
    return held, f"exit {again.returncode}, lock {'taken over' if held else 'not taken over'}"


def manifest_that_is_valid_json_but_not_an_object(root: Path) -> Outcome:
    run_dir = saved_run(root)
    (run_dir / "checkpoints/step00000004/manifest.json").write_text("[]")
    again = run(main_command(run_dir, "train.steps=6", ranks=1))
    held = (
        again.returncode == 0
        and "resumed from" in again.stdout + again.stderr
        and "step00000002" in again.stdout
    )
    return held, f"exit {again.returncode}" + ("" if held else f": {again.stderr[-600:]!r}")


def every_checkpoint_damaged(root: Path) -> Outcome:
    run_dir = saved_run(root)
    for folder in (run_dir / "checkpoints").glob("step*"):
        target = folder / "mp_rank_00_model_states.pt"
        target.write_bytes(target.read_bytes()[:-1])
    before = listing(run_dir / "checkpoints")
    again = run(main_command(run_dir, "train.steps=6", ranks=1))
    held, seen = clean(again, 5, "is damaged")
    unchanged = listing(run_dir / "checkpoints") == before
    return held and unchanged, seen + ("" if unchanged else "; the damaged folders changed")


def full_disk_then_lower_keep_last(root: Path) -> Outcome:
    if os.geteuid() != 0:
        return True, "skipped (mounting a tmpfs needs root)"
    disk = root / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(disk)], check=True)
    try:
        keep_all = [
            "train.steps=6",
            "checkpoint.interval=2",
            "checkpoint.keep_last=0",
            "checkpoint.save_final=true",
        ]
        full = run(main_command(disk / "run", *keep_all))
        first, seen = clean(full, 5, "lower checkpoint.keep_last")
        again = run(main_command(disk / "run", *keep_all, "checkpoint.keep_last=1"))
        return first and again.returncode == 0, f"{seen}, rerun with keep_last=1: exit {again.returncode}"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def config_errors(root: Path) -> Outcome:
    """A YAML syntax error, a malformed override and an empty preset: exit 2, file and position, no traceback."""
    broken, empty = root / "broken.yaml", root / "empty.yaml"
    broken.write_text("model:\n  hidden_size: [64\n")
    empty.write_text("# nothing here\n")
    cases = [
        (main_command(root / "a", ranks=1, config=str(broken)), "broken.yaml"),
        (main_command(root / "b", "data.paths=[a,b", ranks=1), "data.paths=[a,b"),
        (main_command(root / "c", ranks=1, config=str(empty)), "empty.yaml"),
    ]
    seen = [clean(run(command), 2, text) for command, text in cases]
    return all(held for held, _ in seen), ", ".join(s for _, s in seen)


def refused_start_leaves_the_run_dir_unchanged(root: Path) -> Outcome:
    run_dir = saved_run(root)
    before = listing(run_dir)
    refused = run(main_command(run_dir, "train.steps=6", "model.vocab_size=100", ranks=1))
    after = listing(run_dir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return (
        refused.returncode == 2 and not changed,
        f"exit {refused.returncode}, changed: {changed or 'nothing'}",
    )


def ctrl_c_on_the_deepspeed_command(root: Path) -> Outcome:
    run_dir = root / "run"
    proc = start(main_command(run_dir, "train.steps=100000"))
    wait_for_records(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    code = proc.wait(300)
    stderr = proc.stderr.read() if proc.stderr else ""
    saved = "is complete. Run the same command again to continue (exit code 75)" in stderr
    again = run(main_command(run_dir, "train.steps=8"))
    held = saved and again.returncode == 0
    return (
        held,
        f"command exit {code} (ranks 75, checkpoint complete: {saved}); rerun exit {again.returncode}",
    )


def token_id_past_the_vocabulary(root: Path) -> Outcome:
    import numpy as np

    from pretrain.data.indexed import IndexedDataset

    data = prepared_dataset(root)
    shard = IndexedDataset(data / "part-00000" / "shard-00000")
    tokens = np.memmap(shard.bin_path, dtype=shard.dtype, mode="r+")
    tokens[int(shard.pointers[0]) // shard.dtype.itemsize + 3] = 60_000
    tokens.flush()
    del tokens
    result = run(
        main_command(root / "run", f"data.paths=[{data}]", "model.vocab_size=320", "train.steps=200", ranks=1)
    )
    return clean(result, 4, "token id 60000 at")


def manifest_vocabulary_not_the_tokenizers(root: Path) -> Outcome:
    data = prepared_dataset(root)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": manifest["vocab_size"] + 50}))
    return clean(run([sys.executable, "-m", "pretrain.data", "inspect", str(data)]), 4, "records vocab_size")


def prepared_dataset(root: Path) -> Path:
    texts = [f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" * (2 + i % 5) for i in range(400)]
    (root / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = [sys.executable, "-m", "pretrain.data"]
    for step in (["train-tokenizer", "--input", str(root / "in.jsonl"), "--vocab-size", "300", "--output", str(root / "tok")],
                 ["prepare", "--input", str(root / "in.jsonl"), "--tokenizer", str(root / "tok"), "--output", str(root / "d")]):  # fmt: skip
        done = run([*data, *step])
        assert done.returncode == 0, done.stderr[-2000:]
    return root / "d"


# name: (what was done, what must hold, the trial)
TRIALS: dict[str, tuple[str, str, Callable[[Path], Outcome]]] = {
    "finished": ("a finished 2-rank run", "exit 0, never SIGABRT at shutdown (exit 250)", finished_run_exits_0),
    "second-start": ("a second start on a live run.dir", "exit 2 naming the holder; the first trains on",
                     second_start_on_a_live_run_dir),
    "sigkill-rerun": ("SIGKILL of the whole job, then the same command", "the stale lock is taken over; resumes",
                      rerun_after_sigkill_takes_over_the_lock),
    "manifest-list": ("the newest manifest.json is `[]`", "resumes from the previous checkpoint",
                      manifest_that_is_valid_json_but_not_an_object),
    "all-damaged": ("every checkpoint truncated", "exit 5; the folders kept as they were", every_checkpoint_damaged),
    "disk-full": ("disk full with keep_last=0, rerun with keep_last=1", "exit 5 suggesting it; the rerun fits",
                  full_disk_then_lower_keep_last),
    "config-errors": ("YAML syntax error, malformed override, empty preset", "exit 2 naming file or override",
                      config_errors),
    "refused-start": ("a refused start (vocabulary below the data's)", "exit 2; run.dir unchanged",
                      refused_start_leaves_the_run_dir_unchanged),
    "ctrl-c": ("Ctrl-C on `deepspeed` (SIGINT to the group)", "ranks save, exit 75; the rerun continues",
               ctrl_c_on_the_deepspeed_command),
    "bad-token": ("a token id past the vocabulary in a shard", "exit 4 naming shard, document, offset",
                  token_id_past_the_vocabulary),
    "manifest-vocab": ("a dataset manifest whose vocab_size is not its tokenizer's", "inspect exits 4 naming both",
                       manifest_vocabulary_not_the_tokenizers),
}  # fmt: skip


def shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


def run_trial(name: str, repeats: int) -> dict[str, object]:
    title, expected, trial = TRIALS[name]
    count = repeats if name == "finished" else 1
    outcomes = []
    for i in range(count):
        with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
            started = time.time()
            try:
                held, seen = trial(Path(tmp))
            except Exception as e:  # a trial that could not be carried out did not hold
                held, seen = False, f"{type(e).__name__}: {e}"
        outcomes.append({"held": held, "seen": seen, "seconds": round(time.time() - started, 1)})
        print(
            f"  {name} [{i + 1}/{count}]: {'held' if held else 'FAILED'} ({seen})",
            file=sys.stderr,
            flush=True,
        )
    return {"trial": title, "expected": expected, "count": count,
            "held": sum(o["held"] for o in outcomes), "outcomes": outcomes}  # fmt: skip


def table(results: list[dict[str, object]]) -> str:
    rows = ["| trial | runs | expected | outcome |", "| --- | --- | --- | --- |"]
    for r in results:
        outcomes = r["outcomes"]
        seen = outcomes[-1]["seen"] if r["count"] == 1 else f"held {r['held']} of {r['count']}"  # type: ignore[index]
        seen = str(seen).replace("|", "/").replace("\n", " ")
        rows.append(f"| {r['trial']} | {r['count']} | {r['expected']} | {seen[:160]} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="runs of the finished-run trial")
    parser.add_argument("--only", nargs="*", choices=list(TRIALS), help="run only these trials")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    shm_before = shm_buffers()
    results = [run_trial(name, args.repeats) for name in args.only or TRIALS]
    leaked = sorted(shm_buffers() - shm_before)
    results.append({"trial": "/dev/shm after all trials", "expected": "as found", "count": 1, "held": int(not leaked),
                    "outcomes": [{"held": not leaked, "seen": f"{len(leaked)} buffers left"}]})  # fmt: skip
    document = {"results": results, "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    text = json.dumps(document, indent=1)
    print(text)
    print(table(results), file=sys.stderr)
    if args.output:
        args.output.write_text(text + "\n")
    return 0 if all(r["held"] == r["count"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
