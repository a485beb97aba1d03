"""ZeRO-3 never holds the whole model on one rank, and every run records its memory beside the plan.

The real trainer on 2 gloo ranks; peaks are each rank's resident-set high-water mark, which the
trainer records itself (pretrain.train.memory) and writes into run_summary.json.
"""

import pytest

from conftest import TINY
from memory_runs import train_and_read_memory
from pretrain.config import load_config
from pretrain.plan.counts import layer_counts
from pretrain.testing import run_distributed

pytestmark = pytest.mark.slow

MIB = 2**20
# ~57M parameters (228 MB in fp32): large enough that the whole model stands far above the noise of
# a process's resident set (a few MiB of allocator and interpreter churn), small enough for 2 CPU ranks.
MODEL = [
    "model.hidden_size=768",
    "model.num_layers=8",
    "model.num_heads=12",
    "model.num_kv_heads=12",
    "model.ffn_hidden_size=2048",
    "train.seq_len=32",
    "train.global_batch_size=2",
    "train.micro_batch_size=1",
    "train.steps=1",
]


def test_zero3_builds_only_this_ranks_partitions_plus_one_layer(tmp_path):
    overrides = [*MODEL, "parallel.zero_stage=3", "train.precision=fp32"]
    records = run_distributed(train_and_read_memory, 2, overrides, str(tmp_path))[0]
    cfg = load_config(TINY, overrides, world_size=2)
    counts = layer_counts(cfg)
    model_bytes = 4 * sum(c.total for c in counts)
    partitions = model_bytes / 2
    largest_layer = 4 * max(c.total for c in counts)
    assert len(records) == 2 and [r["rank"] for r in records] == [0, 1]
    for r in records:
        built = r["construction_peak_bytes"] - r["baseline_bytes"]
        # Partitions plus the one whole layer being cut, plus 24 MiB for what is not a tensor of ours
        # (allocator pages, the zero.Init bookkeeping, the layer's tensor-parallel and init temporaries
        # are in the layer's bytes). Building the whole model first (the old way) needs >= 228 MB.
        assert built <= partitions + largest_layer + 24 * MIB, (built / MIB, partitions / MIB)
        assert built < model_bytes
        assert (
            r["baseline_bytes"]
            <= r["construction_peak_bytes"]
            <= r["build_peak_bytes"]
            <= r["step_peak_bytes"]
        )
        assert r["planned_bytes"] > partitions / 2  # the planner's figure for this layout is recorded
        assert r["device_step_peak_bytes"] is None  # CPU ranks: no device memory to report
