"""Peak memory of `python -m pretrain.convert to-fp32` and `to-hf --no-verify` against model depth
(prints JSON).

Two DeepSpeed checkpoints of the same width, one `--factor` times deeper than the other, saved by
the real engine after one optimizer step (one process, ZeRO-1; bf16, so the fp32 masters are read
from the optimizer files, beside the Adam moments the conversion must not read). Memory is the peak
anonymous RSS of the conversion process (RssAnon, sampled every 20 ms): the checkpoint is
memory-mapped, and mapped file pages are cache the kernel drops under pressure, not memory the
conversion holds; peak RSS including them is reported too. Target: flat, i.e. the deeper model
needs about the same anonymous memory (about one tensor, the largest being the embedding).

    python bench/convert_memory.py [--layers 4] [--factor 4] [--hidden 512] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def save_checkpoint_after_one_step(run_dir: Path, overrides: list[str]) -> None:
    """Build the engine on one process, take one optimizer step (so the Adam moments exist and are
    saved) and save it with plain DeepSpeed (its files and `latest` pointer, no manifest)."""
    import torch

    from pretrain.config import load_config
    from pretrain.parallel import build_engine, build_parallel_context, init_distributed, parallelize_model

    cfg = load_config(REPO / "configs" / "tiny.yaml", [*overrides, f"run.dir={run_dir}"], world_size=1)
    dist = init_distributed()
    ctx = build_parallel_context(cfg, 0, 1)
    engine, _ = build_engine(cfg, parallelize_model(cfg, ctx, dist.device), 1, cfg.train.precision, ctx)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len + 1))
    engine.train_step([(tokens[:, :-1], tokens[:, 1:])])
    engine.ds.save_checkpoint(str(run_dir / "checkpoints"), tag="step00000000", client_state={"step": 0})
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    torch.distributed.barrier()


def rss_anon_kb(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields.get("RssAnon", 0), fields.get("VmRSS", 0)


def measure(command: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_rss = 0
    while child.poll() is None:
        try:
            anon, rss = rss_anon_kb(child.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        time.sleep(0.02)
    _, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{err[-2000:]}")
    return {
        "peak_anon_mb": round(peak_anon / 1024, 1),
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    from pretrain.parallel.distributed import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # What importing torch, DeepSpeed and the converter costs before any tensor is read.
    imports = (
        "import time, pretrain.convert.commands, pretrain.checkpoint.deepspeed_reader, pretrain.train.build"
    )
    baseline = measure([sys.executable, "-c", f"{imports}; time.sleep(0.5)"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (args.layers, args.layers * args.factor):
            run_dir = Path(tmp) / f"L{layers}"
            overrides = [
                f"model.num_layers={layers}", f"model.hidden_size={args.hidden}", "model.num_heads=8",
                "model.num_kv_heads=8", f"model.ffn_hidden_size={3 * args.hidden}",
                f"model.vocab_size={args.vocab}", "train.precision=bf16", "parallel.zero_stage=1",
                "train.global_batch_size=1", "train.micro_batch_size=1", "train.seq_len=16",
            ]  # fmt: skip
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress prints; stdout is the JSON
                save_checkpoint_after_one_step(run_dir, overrides)
            files = list((run_dir / "checkpoints" / "step00000000").iterdir())
            entry = {
                "layers": layers,
                "checkpoint_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
                "fp32_weights_mb": None,
                "largest_tensor_mb": round(args.vocab * args.hidden * 4 / 1e6, 1),
            }
            out = Path(tmp) / f"L{layers}.safetensors"
            convert = [sys.executable, "-m", "pretrain.convert"]
            entry["to_fp32"] = measure(
                [*convert, "to-fp32", "--checkpoint", str(run_dir), "--output", str(out)]
            )
            entry["fp32_weights_mb"] = round(out.stat().st_size / 1e6, 1)
            entry["to_hf_no_verify"] = measure(
                [*convert, "to-hf", "--checkpoint", str(run_dir), "--output", str(Path(tmp) / f"hf{layers}"),
                 "--no-verify", "--dtype", "fp32"]
            )  # fmt: skip
            results.append(entry)
    small, large = results
    print(
        json.dumps(
            {
                "import_baseline_anon_mb": baseline["peak_anon_mb"],
                "runs": results,
                "weights_ratio": round(large["fp32_weights_mb"] / small["fp32_weights_mb"], 2),
                "to_fp32_anon_ratio": round(
                    large["to_fp32"]["peak_anon_mb"] / small["to_fp32"]["peak_anon_mb"], 2
                ),
                "to_hf_anon_ratio": round(
                    large["to_hf_no_verify"]["peak_anon_mb"] / small["to_hf_no_verify"]["peak_anon_mb"], 2
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
