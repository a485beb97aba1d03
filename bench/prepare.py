"""Data preparation benchmarks (prints JSON):

(a) throughput: `prepare` tokens/s divided by raw `tokenizers` `encode_batch` tokens/s on the same
    text with the same cores, measured in one run (target >= 0.8);
(c) memory: peak RSS of the `prepare` command (largest process, tokenizer workers included) on the
    corpus and on 10x the corpus (target: flat).

The text is the Python standard library's source (about 11 MB), repeated to the sizes wanted.

    python bench/prepare.py [--workers 2] [--scale 10]
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

from pretrain.data.builtin import stdlib_documents
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer


def write_corpus(path: Path, texts: list[str], copies: int) -> None:
    with path.open("w") as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MB of the largest process the command started, seconds) in a fresh interpreter."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"subprocess.run({command!r}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scale", type=int, default=10, help="input multiple for the memory measurement")
    args = parser.parse_args()
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_documents()]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_tokenizer(texts, 4096, tmp / "tok")
        tokenizer = load_tokenizer(tmp / "tok")
        write_corpus(tmp / "x1.jsonl", texts, 1)
        write_corpus(tmp / "x10.jsonl", texts, args.scale)

        start = time.perf_counter()
        raw_tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))  # +1: the EOD prepare appends
        raw_seconds = time.perf_counter() - start

        def prepare_cmd(name: str) -> list[str]:
            return [sys.executable, "-m", "pretrain.data", "prepare", "--input", str(tmp / f"{name}.jsonl"),
                    "--tokenizer", str(tmp / "tok"), "--output", str(tmp / name), "--workers", str(args.workers)]  # fmt: skip

        rss_1, seconds_1 = peak_rss_mb(prepare_cmd("x1"))
        rss_10, seconds_10 = peak_rss_mb(prepare_cmd("x10"))
        manifest = json.loads((tmp / "x1" / "manifest.json").read_text())
        assert manifest["num_tokens"] == raw_tokens, (manifest["num_tokens"], raw_tokens)
        # The prepare timing above includes interpreter start-up and imports; time the work alone too.
        from pretrain.data.prepare import prepare

        start = time.perf_counter()
        prepare([str(tmp / "x1.jsonl")], str(tmp / "tok"), tmp / "again", workers=args.workers)
        prepare_seconds = time.perf_counter() - start
    result = {
        "benchmark": "prepare",
        "input_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 1),
        "tokens": raw_tokens,
        "cores": os.cpu_count(),
        "workers": args.workers,
        "raw_encode_batch_tokens_per_sec": round(raw_tokens / raw_seconds),
        "prepare_tokens_per_sec": round(raw_tokens / prepare_seconds),
        "prepare_over_raw": round(raw_seconds / prepare_seconds, 3),
        "target_prepare_over_raw": 0.8,
        "peak_rss_mb": {"1x": round(rss_1), f"{args.scale}x": round(rss_10)},
        "command_seconds": {"1x": round(seconds_1, 1), f"{args.scale}x": round(seconds_10, 1)},
        "rss_growth": round(rss_10 / rss_1, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
