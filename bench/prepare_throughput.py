"""Prepare throughput against raw tokenization (prints one JSON line).

`prepare` tokens/s (read jsonl through `datasets`, tokenize in `--workers` processes, write shards,
checksum them, write the manifest) divided by raw `tokenizers` `Tokenizer.encode_batch` tokens/s on
the same texts, with the same cores, in one run. The raw side gets every core through the library's
own thread pool. Runs alternate (raw, prepare, raw, prepare, ...) so that a neighbour's load hits
both sides alike; the best of each side is reported. Target: prepare / raw >= 0.8.

The text is the Python standard library's source (about 11 MB), repeated `--copies` times.

    python bench/prepare_throughput.py [--workers 2] [--copies 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pretrain.data.builtin import stdlib_documents
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer


def stdlib_texts() -> list[str]:
    return [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_documents()]


def write_jsonl(path: Path, texts: list[str], copies: int) -> None:
    with path.open("w") as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--copies", type=int, default=2, help="stdlib copies in the input")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    texts = stdlib_texts()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_tokenizer(texts, args.vocab_size, tmp / "tok")
        tokenizer = load_tokenizer(tmp / "tok")
        corpus = texts * args.copies
        write_jsonl(tmp / "input.jsonl", texts, args.copies)

        raw_seconds, prepare_seconds, raw_fast_seconds = [], [], []
        tokens = 0
        for repeat in range(args.repeats):
            start = time.perf_counter()
            encodings = tokenizer.inner.encode_batch(corpus, add_special_tokens=False)
            raw_seconds.append(time.perf_counter() - start)
            tokens = sum(len(e.ids) for e in encodings) + len(corpus)  # + the EOD prepare appends
            del encodings

            start = time.perf_counter()
            tokenizer.inner.encode_batch_fast(corpus, add_special_tokens=False)
            raw_fast_seconds.append(time.perf_counter() - start)

            output = tmp / f"out{repeat}"
            start = time.perf_counter()
            manifest = prepare([str(tmp / "input.jsonl")], str(tmp / "tok"), output, workers=args.workers)
            prepare_seconds.append(time.perf_counter() - start)
            assert manifest is not None and manifest.num_tokens == tokens, (manifest, tokens)
            shutil.rmtree(output)

    raw, fast, prep = min(raw_seconds), min(raw_fast_seconds), min(prepare_seconds)
    print(
        json.dumps(
            {
                "benchmark": "prepare_throughput",
                "input_mb": round(sum(len(t.encode()) for t in corpus) / 1e6, 1),
                "documents": len(corpus),
                "tokens": tokens,
                "vocab_size": args.vocab_size,
                "cpu_count": os.cpu_count(),
                "workers": args.workers,
                "machine": platform.machine(),
                "raw_encode_batch_tokens_per_sec": round(tokens / raw),
                "raw_encode_batch_fast_tokens_per_sec": round(tokens / fast),
                "prepare_tokens_per_sec": round(tokens / prep),
                "prepare_over_raw": round(raw / prep, 3),
                "prepare_over_raw_fast": round(fast / prep, 3),
                "target_prepare_over_raw": 0.8,
                "seconds": {
                    "raw": [round(s, 2) for s in raw_seconds],
                    "raw_fast": [round(s, 2) for s in raw_fast_seconds],
                    "prepare": [round(s, 2) for s in prepare_seconds],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
