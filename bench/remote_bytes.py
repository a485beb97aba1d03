"""Bytes a remote dataset costs: what the loader reads against what an HTTP server on loopback serves.

Writes a prepared dataset of random uint16 tokens, serves it with the byte-range server of
tests/test_data_remote.py (it counts the bytes it sends), and measures, each with a fresh cache:
  sequential  one process reads the first 10% of the training samples in order;
  node        N processes of one node (one cache folder) each read every sample;
  shuffled    one process reads 10% of the samples in the training order (DistributedBatches), per
              chunk size, in both orders: `global` (data.shuffle_block=0, order version 2), where
              random access costs whole chunks, and `blocks` (the default for remote data: blocks of 4
              chunks, here in windows of --window blocks), which fetches about the share read plus
              at most one window.
Prints JSON.

    python bench/remote_bytes.py [--tokens 2000000] [--seq-len 512] [--processes 4] [--window 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pretrain.data.block_order import shuffle_blocks  # noqa: E402
from pretrain.data.loader import DistributedBatches  # noqa: E402
from pretrain.data.shards import open_dataset  # noqa: E402
from test_data_remote import RangeServer, bin_bytes, config, write_dataset  # noqa: E402


def read_in_order(url: str, cfg: Any, seq_len: int, fraction: float) -> int:
    """Bytes of tokens the loader returned reading the first `fraction` of the training samples."""
    samples = open_dataset(url, cfg, seq_len).train
    return sum(samples[i].nbytes for i in range(int(len(samples) * fraction)))


def read_shuffled(url: str, cfg: Any, seq_len: int, fraction: float) -> int:
    samples = open_dataset(url, cfg, seq_len).train
    batches = DistributedBatches(samples, 1234, 16, 16, 0, 1)
    read = 0
    while read < fraction * len(samples) * (seq_len + 1) * 2:
        read += sum(tokens.numel() * 2 + 2 * len(tokens) for tokens, _ in batches.next_step())
    return read


def measure(
    folder: Path, cache: Path, seq_len: int, processes: int, chunk: str, **order: Any
) -> dict[str, Any]:
    with RangeServer(folder.parent) as server:
        url = f"{server.url}/{folder.name}"
        cfg = config(url, cache, cache_chunk=chunk, cache_limit="1GB", **order)
        if processes == 0:
            read = read_shuffled(url, cfg, seq_len, 0.1)
        elif processes == 1:
            read = read_in_order(url, cfg, seq_len, 0.1)
        else:
            with mp.get_context("spawn").Pool(processes) as pool:
                read = sum(pool.starmap(read_in_order, [(url, cfg, seq_len, 1.0)] * processes))
        served = server.bytes_served(".bin")
    total = bin_bytes(folder)
    blocks = shuffle_blocks(cfg, remote=True, seq_len=seq_len, token_bytes=2)  # write_dataset's uint16
    return {
        **({"shuffle_blocks": list(blocks)} if processes == 0 else {}),
        "bytes_read_by_loader": read,
        "bin_bytes_served": served,
        "served_fraction": round(served / total, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens per shard (2 shards)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--window", type=int, default=4, help="data.shuffle_window of the block order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "d"
        write_dataset(folder, tokens=args.tokens)
        chunk = "64KiB"
        runs = {
            "sequential_10pct_1_process": measure(folder, Path(tmp) / "c1", args.seq_len, 1, chunk),
            f"all_samples_{args.processes}_processes_one_node": measure(
                folder, Path(tmp) / "cn", args.seq_len, args.processes, chunk
            ),
        }
        for shuffled_chunk in ("4KiB", "64KiB", "1MiB"):
            for name, order in (
                ("global", {"shuffle_block": 0}),
                ("blocks", {"shuffle_window": args.window}),
            ):
                runs[f"shuffled_10pct_chunk_{shuffled_chunk}_{name}"] = measure(
                    folder, Path(tmp) / f"s{shuffled_chunk}{name}", args.seq_len, 0, shuffled_chunk, **order
                )
        result = {
            "dataset_bin_bytes": bin_bytes(folder),
            "seq_len": args.seq_len,
            "cache_chunk": chunk,
            **runs,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
