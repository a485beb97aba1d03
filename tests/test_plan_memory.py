"""The planner's memory estimate against the peak memory of real training steps on this machine's CPU.

Each case runs tests/plan_memory_probe.py in a fresh process (its docstring says exactly what is
measured and why it is comparable) and compares the growth of its peak resident set with
pretrain.plan's estimated peak for the same config on the CPU runtime (fp32, foreach AdamW, gradient
buckets not resident, the CPU attention kernel's selective-recomputation behaviour). The estimate is
not fitted to these runs: every term comes from the code (see pretrain/plan/memory.py and
activations.py). What it leaves out on a CPU is small: Python objects, the autograd graph, glibc's
bookkeeping, page rounding.

The tiny preset's peak is activation-bound (the backward pass), the ~90M model's optimizer-bound
(the optimizer step), so both halves of the model are checked. The mixture-of-experts preset
(configs/tiny-moe.yaml, ep 1) checks the MoE blocks' terms: router, permuted tokens, experts; its
expert-parallel split is checked on a real two-rank engine by tests/test_plan_moe.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plan_memory_probe import load_case
from pretrain.plan.memory import CPU, estimate_memory

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "plan_memory_probe.py"
TOLERANCE = 0.15  # the bar

# ~88M parameters: 12 blocks of 768 with 12 heads (4 kv-heads), SwiGLU 2048, vocabulary 8192.
MODEL_100M = [
    "model.hidden_size=768",
    "model.num_layers=12",
    "model.num_heads=12",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=2048",
    "model.vocab_size=8192",
    "train.seq_len=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]


CASES = {
    "tiny-none": ["parallel.activation_checkpointing=none"],
    "tiny-selective": ["parallel.activation_checkpointing=selective"],
    "tiny-full": ["parallel.activation_checkpointing=full"],
    "100m": MODEL_100M,
    "100m-zero3": [*MODEL_100M, "parallel.zero_stage=3"],
    **{
        f"tiny-moe-{mode}": ["config=configs/tiny-moe.yaml", f"parallel.activation_checkpointing={mode}"]
        for mode in ("none", "selective", "full")
    },
}


@pytest.fixture(scope="module")
def measured() -> dict[str, int]:
    """Peak growth of every case, measured one after the other in one fresh process (one start-up)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "DS_ACCELERATOR": "cpu"}
    # Two steps each, so the second runs with Adam's state allocated.
    result = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(list(CASES.values())), "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_bytes"]
    return dict(zip(CASES, growth, strict=True))


def estimated_peak(overrides: list[str]) -> tuple[int, str]:
    cfg = load_case(overrides)  # the probe's own config of the case
    plan = estimate_memory(cfg, world_size=1, capacity=2**40, runtime=CPU)
    return plan.worst.peak, plan.worst.peak_phase


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_tiny_preset_peak_matches_estimate(measured, mode):
    # The preset as it is: micro-batch 4 x accumulation 4 on one process, ZeRO-1.
    estimate, phase = estimated_peak(CASES[f"tiny-{mode}"])
    assert phase == "backward"  # activation-bound
    assert abs(estimate - measured[f"tiny-{mode}"]) <= TOLERANCE * measured[f"tiny-{mode}"], (
        estimate,
        measured[f"tiny-{mode}"],
    )


@pytest.mark.slow
def test_100m_model_peak_matches_estimate(measured):
    estimate, phase = estimated_peak(MODEL_100M)
    assert phase == "optimizer step"  # weights, master, Adam, gradients, flat copy, foreach temporary
    assert abs(estimate - measured["100m"]) <= TOLERANCE * measured["100m"], (estimate, measured["100m"])


@pytest.mark.slow
def test_100m_model_zero3_peak_matches_estimate(measured):
    # One process, so ZeRO-3's partitions are whole: its own buffers and sub-grouped step are checked.
    estimate, phase = estimated_peak(CASES["100m-zero3"])
    # The gradient partition is held from the backward pass on, and the step's temporaries are one
    # sub-group's (an eighth): the backward pass is the peak now.
    assert phase == "backward"
    assert abs(estimate - measured["100m-zero3"]) <= TOLERANCE * measured["100m-zero3"], (
        estimate,
        measured["100m-zero3"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_tiny_moe_preset_peak_matches_estimate(measured, mode):
    # Micro-batch 4 x accumulation 4, 3 MoE blocks of 8 experts (top-2) and a shared one, ZeRO-1.
    case = f"tiny-moe-{mode}"
    estimate, phase = estimated_peak(CASES[case])
    assert phase == "backward"  # activation-bound
    assert abs(estimate - measured[case]) <= TOLERANCE * measured[case], (estimate, measured[case])
