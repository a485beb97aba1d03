"""Peak memory of `python -m pretrain.data prepare` on N MB and on 10 x N MB of input (prints JSON).

Memory is the proportional set size (PSS) of the whole process tree (the command plus its forked
tokenizer workers), summed and sampled every 100 ms with psutil. PSS splits pages the workers share
with their parent (copy-on-write after fork) between them; summing plain RSS would count the
parent's imports (torch, datasets) once per worker. The largest single process's peak RSS
(getrusage) is reported too. Target: flat, i.e. the 10x input needs about the same memory.

The input is the Python standard library's source (about 11 MB, 600 files) `--copies` times, and
`--factor` times that. Whole copies on both sides: memory depends on the largest document seen (its encoding is the
biggest allocation), so a 1x input cut short of the largest file would flatter the 1x side.

    python bench/prepare_memory.py [--copies 1] [--factor 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pretrain.data.builtin import stdlib_documents
from pretrain.data.tokenizer import train_tokenizer


def write_jsonl(path: Path, texts: list[str], copies: int) -> float:
    """`copies` times every text; returns the MB of text written."""
    with path.open("w") as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return copies * sum(len(t.encode()) for t in texts) / 1e6


def tree_pss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker exiting between the listing and the read
            total += p.memory_full_info().pss
    return total


def measure(command: list[str]) -> dict[str, object]:
    """Peak summed PSS of the process tree (MB), the largest process's peak RSS (MB), and seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = psutil.Process(child.pid)
    samples: list[int] = []
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):
            samples.append(tree_pss(process))
        time.sleep(0.1)
    # Peak per quarter of the run: memory that grows with the input rises quarter by quarter, a
    # warm-up (allocator pools, tokenizer caches) levels off after the first.
    quarters = [
        max(q, default=0)
        for q in (samples[i * len(samples) // 4 : (i + 1) * len(samples) // 4] for i in range(4))
    ]
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over children
    return {
        "peak_tree_pss_mb": round(max(samples, default=0) / 2**20),
        "peak_tree_pss_mb_by_quarter": [round(q / 2**20) for q in quarters],
        "largest_process_rss_mb": round(max(largest, before) / 1024),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=1, help="stdlib copies in the small input")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_documents()]
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_tokenizer(texts, 4096, tmp / "tok")
        for name, copies in (("1x", args.copies), (f"{args.factor}x", args.copies * args.factor)):
            megabytes = write_jsonl(tmp / f"{name}.jsonl", texts, copies)
            command = [sys.executable, "-m", "pretrain.data", "prepare", "--input", str(tmp / f"{name}.jsonl"),
                       "--tokenizer", str(tmp / "tok"), "--output", str(tmp / name),
                       "--workers", str(args.workers)]  # fmt: skip
            results[name] = {
                "input_mb": round(megabytes, 1),
                "documents": copies * len(texts),
                **measure(command),
            }
            results[name]["tokens"] = json.loads((tmp / name / "manifest.json").read_text())["num_tokens"]
    small, large = results["1x"]["peak_tree_pss_mb"], results[f"{args.factor}x"]["peak_tree_pss_mb"]
    print(
        json.dumps(
            {
                "benchmark": "prepare_memory",
                "workers": args.workers,
                "cpu_count": os.cpu_count(),
                "runs": results,
                "peak_tree_pss_growth": round(large / small, 3),
                "target": "flat (growth close to 1.0)",
            }
        )
    )


if __name__ == "__main__":
    main()
