"""Loader throughput: tokens/s that one process's DistributedBatches delivers from local shards.

Writes a synthetic dataset of random uint16 tokens in the Megatron layout (several shards), opens it
the way training does (memory-mapped TokenStream), and times `next_step()` over a blend of two
datasets at the tiny preset's batch shape and at a long-sequence shape. Prints JSON.

    python bench/loader_throughput.py [--tokens 50000000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from pretrain.data.loader import DistributedBatches, PackedSamples, TokenStream


def write_dataset(directory: Path, tokens: int, shards: int, seed: int) -> list[IndexedDataset]:
    rng = np.random.default_rng(seed)
    opened = []
    for shard in range(shards):
        writer = IndexedDatasetWriter(directory / f"shard-{shard:05d}", np.uint16)
        remaining = tokens // shards
        while remaining > 0:
            length = int(min(remaining, rng.integers(200, 4000)))
            writer.add_document(rng.integers(0, 32000, length, dtype=np.uint16))
            remaining -= length
        writer.finalize()
        opened.append(IndexedDataset(directory / f"shard-{shard:05d}"))
    return opened


def measure(datasets: list[PackedSamples], global_batch: int, micro: int, seconds: float) -> float:
    loader = DistributedBatches(datasets, 1234, global_batch, micro, dp_rank=0, dp_size=1, weights=[0.7, 0.3])
    loader.next_step()  # first touch of the permutation
    delivered, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for inputs, _ in loader.next_step():
            delivered += inputs.numel()
    return delivered / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=50_000_000, help="tokens per dataset")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per shape")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        streams = []
        for index in range(2):
            folder = Path(tmp) / f"d{index}"
            folder.mkdir()
            streams.append(TokenStream([s.tokens for s in write_dataset(folder, args.tokens, 4, index)]))
        results = {}
        for name, seq_len, global_batch, micro in (("tiny_seq256", 256, 16, 4), ("seq4096", 4096, 64, 8)):
            datasets = [PackedSamples(stream, seq_len) for stream in streams]
            results[name] = measure(datasets, global_batch, micro, args.seconds)
    print(
        json.dumps(
            {
                "benchmark": "loader_throughput",
                "tokens_per_dataset": args.tokens,
                "tokens_per_sec_per_process": {k: round(v) for k, v in results.items()},
                "target_tokens_per_sec": 5_000_000,
                "meets_target": all(v >= 5_000_000 for v in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
