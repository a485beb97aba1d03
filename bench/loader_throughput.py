"""Loader throughput: tokens/s that one process's DistributedBatches delivers from local shards.

Writes a synthetic dataset of random uint16 tokens in the Megatron layout (several shards), opens it
the way training does (memory-mapped TokenStream), and times `next_step()` over a blend of two
datasets at the tiny preset's batch shape and at a long-sequence shape. Then, at each shape, how long
`next_step()` holds the training thread per step when each step's compute takes `--step-ms` (a sleep:
like a GPU step's wait for its kernels, it leaves the interpreter to other threads), reading inline
against reading ahead in the loader's background thread (`prefetch=True`, as training uses it).
Prints JSON.

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


def training_thread_ms(
    datasets: list[PackedSamples], shape: tuple[int, int], prefetch: bool, step_ms: float
) -> float:
    global_batch, micro = shape
    loader = DistributedBatches(
        datasets, 1234, global_batch, micro, 0, 1, weights=[0.7, 0.3], prefetch=prefetch
    )
    loader.next_step()
    held, steps = 0.0, 20
    for _ in range(steps):
        time.sleep(step_ms / 1000)  # the step's compute
        start = time.perf_counter()
        loader.next_step()
        held += time.perf_counter() - start
    return 1000 * held / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=50_000_000, help="tokens per dataset")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per shape")
    parser.add_argument(
        "--step-ms", type=float, default=100.0, help="compute per step for the prefetch check"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        streams = []
        for index in range(2):
            folder = Path(tmp) / f"d{index}"
            folder.mkdir()
            streams.append(TokenStream([s.tokens for s in write_dataset(folder, args.tokens, 4, index)]))
        results, held = {}, {}
        for name, seq_len, global_batch, micro in (("tiny_seq256", 256, 16, 4), ("seq4096", 4096, 64, 8)):
            datasets = [PackedSamples(stream, seq_len) for stream in streams]
            results[name] = measure(datasets, global_batch, micro, args.seconds)
            held[name] = {
                mode: round(
                    training_thread_ms(datasets, (global_batch, micro), mode == "prefetch", args.step_ms), 3
                )
                for mode in ("inline", "prefetch")
            }
    print(
        json.dumps(
            {
                "benchmark": "loader_throughput",
                "tokens_per_dataset": args.tokens,
                "tokens_per_sec_per_process": {k: round(v) for k, v in results.items()},
                "target_tokens_per_sec": 5_000_000,
                "meets_target": all(v >= 5_000_000 for v in results.values()),
                "step_ms": args.step_ms,
                "next_step_ms_on_training_thread": held,
            }
        )
    )


if __name__ == "__main__":
    main()
