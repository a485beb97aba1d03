"""Training throughput of the framework against a plain-PyTorch loop of the same model, in one run (JSON).

    python bench/throughput.py                                   # GPU: 125m, 350m, 1.3b; CPU: tiny
    python bench/throughput.py --size 125m 350m 1.3b             # one GPU: bf16, ZeRO-1, flash SDPA
    python bench/throughput.py --size tiny --steps 4 --rounds 3  # CPU
    python bench/throughput.py --size 125m train.compile=true    # dotted overrides, as for the trainer

Each size runs in a fresh process on one device (a world of one, as `python pretrain/main.py` is):

- framework: the real trainer from `pretrain.train.build_trainer` (the DeepSpeed engine with the derived
  DeepSpeed config, the loader, the loop and its callbacks; console, metrics file, TensorBoard, plots,
  evaluation and checkpoint saves off), driven through `Trainer.fit`.
- plain: the same model (the same layers with the same seeded initial weights and the same
  recomputation and compile settings), the same batches (the framework loader's, taken before training
  and held on the device, so the baseline pays nothing for data), the same AdamW hyper-parameters
  (fused on GPU, foreach on CPU), LR schedule and gradient clipping, in a minimal loop without DeepSpeed.
  In bf16 it keeps DeepSpeed's arithmetic: bf16 weights, activations and gradients (accumulated in bf16,
  as DeepSpeed's ZeRO-1 does by default), fp32 master weights (made from the bf16 weights, as DeepSpeed
  makes them) and Adam states.

After `--warmup` steps each, the two alternate in rounds of `--steps` optimizer steps (F P P F F P ...),
so that drift in the machine's speed falls on both alike. Both train the same global steps on the same
batches, and their losses must agree (`loss_max_rel_diff`): the baseline computes what the framework does.
Tokens/s is the median over rounds; framework_over_plain is the ratio of the medians (and the median of
the ratios of adjacent rounds). TFLOP/s and MFU use the trainer's FLOPs per token
(`pretrain.model.flops_per_token`) and peak (`pretrain.train.mfu.peak_tflops`: the detected GPU's bf16
dense peak; null on CPU). Peak memory is the device's allocated peak during each side's rounds, less
what the other side keeps resident (null on CPU). `scalar_reads_per_step` counts reads of a tensor's
value into Python (`aten::_local_scalar_dense`: .item(), float(), bool(), .tolist()) in one profiled
step: on a GPU each one is a host synchronisation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "tiny": REPO / "configs" / "tiny.yaml",
    "125m": REPO / "configs" / "125m.yaml",
    "tiny-moe": REPO / "configs" / "tiny-moe.yaml",
    "350m": REPO / "configs" / "350m.yaml",
    "1.3b": REPO / "configs" / "1.3b.yaml",
}
GiB = 2**30


def preset_path(size: str) -> Path:
    return SIZES[size] if size in SIZES else Path(size)


def bench_config(preset: Path, overrides: list[str], opts: argparse.Namespace, run_dir: str) -> Any:
    """The preset with the user's overrides, then what the harness needs: one device, micro-batch x
    accumulation sequences per step, enough steps for every round, no evaluation, saves or sinks."""
    from pretrain.config import load_config

    base = load_config(preset, overrides)
    micro = opts.micro_batch or base.train.micro_batch_size
    seq_len = opts.seq_len or base.train.seq_len
    total = opts.warmup + opts.rounds * opts.steps
    forced = [
        f"train.steps={total}", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * opts.accum}",
        "train.grad_accum_steps=null", f"train.seq_len={seq_len}", "train.eval_interval=0",
        "checkpoint.interval=0", "checkpoint.save_final=false", "checkpoint.resume=none",
        "logging.tensorboard=false", "logging.plot=false", f"run.dir={run_dir}", "run.overwrite=true",
    ]  # fmt: skip
    return load_config(preset, [*overrides, *forced], world_size=1)


# ---------------------------------------------------------------------------------------------
# The baseline


class PlainLoop:
    """The minimal plain-PyTorch training loop of the framework's model (see the module docstring)."""

    def __init__(self, cfg: Any, device: Any, precision: str, total_steps: int):
        import torch

        from pretrain.model import Transformer
        from pretrain.optim import parameter_groups
        from pretrain.optim.schedule import LRSchedule
        from pretrain.parallel.expert_parallel import set_loss_gradient_scale
        from pretrain.parallel.recompute import apply_activation_checkpointing

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the plain baseline runs fp32 or bf16, not {precision}")
        self.cfg, self.device, self.precision = cfg, device, precision
        model = Transformer(cfg.model, cfg.padded_vocab_size, seed=cfg.seed)
        for block in model.blocks:
            apply_activation_checkpointing(block, cfg.parallel.activation_checkpointing)
        if getattr(cfg.train, "compile", False):
            for block in model.blocks:
                block.compile()
        set_loss_gradient_scale(list(model.blocks), cfg.grad_accum_steps(1))  # as the trainer does
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model = model.to(device=device, dtype=dtype)
        groups = parameter_groups(self.model, cfg.optim.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.masters = self.params
        if precision == "bf16":  # fp32 masters from the bf16 weights, as DeepSpeed makes them
            self.masters = [torch.nn.Parameter(p.detach().float()) for p in self.params]
            it = iter(self.masters)
            groups = [{**g, "params": [next(it) for _ in g["params"]]} for g in groups]
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            fused=cuda or None,
            foreach=None if cuda else True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRSchedule(cfg.schedule, total_steps)
        )
        self.losses: list[Any] = []

    def step(self, micro_batches: list[tuple[Any, Any]]) -> None:
        import torch

        losses = []
        for tokens, labels in micro_batches:
            loss = self.model(tokens, labels)
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        if self.masters is not self.params:
            for master, param in zip(self.masters, self.params, strict=True):
                master.grad = param.grad.float()  # type: ignore[union-attr]
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_expert_bias()
        if self.masters is not self.params:
            self.model.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        self.losses.append(torch.stack(losses).mean())

    def _update_expert_bias(self) -> None:
        """Auxiliary-loss-free balancing after the step, as the framework's ExpertBalance does."""
        from pretrain.model.moe import MixtureOfExperts
        from pretrain.train.callbacks.moe import update_expert_bias

        for module in self.model.modules():
            if isinstance(module, MixtureOfExperts):
                load = module.take_statistics().tokens_per_expert
                update_expert_bias(module, load, self.cfg.model.moe.bias_update_rate)


# ---------------------------------------------------------------------------------------------
# Measurement (in the process that owns the device)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Framework:
    """The real trainer, with the harness's hands on it: each round is one `fit()` to a later step."""

    def __init__(self, cfg: Any):
        from pretrain.parallel import init_distributed
        from pretrain.train import build_trainer
        from pretrain.train.callbacks import ConsoleProgress, JsonlWriter

        self.trainer = build_trainer(cfg, init_distributed())
        # The sinks write files and lines a benchmark does not want (and JsonlWriter closes its file at
        # the end of each fit); the producers (throughput, non-finite guard, checkpoint cadence) stay.
        self.trainer.callbacks = [
            c for c in self.trainer.callbacks if not isinstance(c, ConsoleProgress | JsonlWriter)
        ]
        self.losses: list[Any] = []
        self.loader_s = 0.0
        engine_step, next_step = self.trainer.engine.train_step, self.trainer.train_batches.next_step

        def train_step(micro_batches: list[Any]) -> Any:
            loss = engine_step(micro_batches)
            self.losses.append(loss.detach())  # stays on the device: no sync
            return loss

        def timed_next_step() -> Any:
            start = time.perf_counter()
            batches = next_step()
            self.loader_s += time.perf_counter() - start
            return batches

        self.trainer.engine.train_step = train_step  # type: ignore[method-assign]
        self.trainer.train_batches.next_step = timed_next_step  # type: ignore[method-assign]

    def batches(self, steps: int) -> list[Any]:
        """The loader's batches for the next `steps` steps, without consuming them."""
        loader = self.trainer.train_batches
        state = loader.state_dict()
        out = [type(loader).next_step(loader) for _ in range(steps)]
        loader.load_state_dict(state)
        return out

    def run(self, steps: int) -> None:
        self.trainer.cfg.train.steps = self.trainer.state.step + steps
        self.trainer.fit()


def _time_round(device: Any, fn: Any) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _scalar_reads(device: Any, fn: Any) -> int:
    """How many times one call of `fn` reads a tensor's value into Python."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def _profile(device: Any, fn: Any, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        _sync(device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    prof.export_chrome_trace(str(path.with_suffix(".json")))


def measure(preset: Path, overrides: list[str], opts: argparse.Namespace) -> dict[str, Any]:
    """Both sides of one size in this process (which must own one device); the JSON record."""
    import torch

    from pretrain.model import count_parameters, flops_per_token
    from pretrain.parallel import resolve_precision
    from pretrain.train.mfu import peak_tflops

    sides = ("framework", "plain") if opts.side == "both" else (opts.side,)
    times: dict[str, list[float]] = {side: [] for side in sides}
    peaks: dict[str, list[int]] = {side: [] for side in sides}
    resident: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        cfg = bench_config(preset, overrides, opts, tmp)
        total_steps = cfg.train.steps  # the framework side moves cfg.train.steps on round by round
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        precision = resolve_precision(cfg.train.precision, device)
        allocated = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
        base = allocated()

        # The framework is built first (the real builder also seeds and opens the data); the baseline
        # trains on the batches its loader gives for the same steps.
        framework = _Framework(cfg)
        batches = [
            [(t.to(device), y.to(device)) for t, y in step] for step in framework.batches(total_steps + 2)
        ]  # + the profiled steps
        plain: PlainLoop | None = None
        done = 0

        def plain_steps(n: int) -> None:
            nonlocal done
            assert plain is not None
            for _ in range(n):
                plain.step(batches[done])
                done += 1
            plain.losses[-1].item()  # a round ends when its last loss is known, as the trainer's log does

        def step_fn(side: str, n: int) -> Any:
            return (lambda: framework.run(n)) if side == "framework" else (lambda: plain_steps(n))

        def run(side: str, n: int, record: bool) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _time_round(device, step_fn(side, n))
            if record:
                times[side].append(seconds)
                if cuda:
                    peaks[side].append(torch.cuda.max_memory_allocated(device))
            print(f"{preset.stem} {side}: {n} steps in {seconds:.3f} s", file=sys.stderr, flush=True)

        # Warm-up (first allocations, compilation, caches), and what each side keeps resident between
        # steps (weights, optimizer states, DeepSpeed's buffers), to take out of the other side's peak.
        if "framework" in sides:
            run("framework", opts.warmup, record=False)
        resident["framework"] = allocated() - base
        if "plain" in sides:
            plain = PlainLoop(cfg, device, precision, total_steps)
            run("plain", opts.warmup, record=False)
        resident["plain"] = allocated() - base - resident["framework"]
        for r in range(opts.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                run(side, opts.steps, record=True)

        scalar_reads = {side: _scalar_reads(device, step_fn(side, 1)) for side in sides}
        profiles = {}
        if opts.profile:
            folder = Path(opts.profile)
            folder.mkdir(parents=True, exist_ok=True)
            for side in sides:
                path = folder / f"{preset.stem}-{side}"
                _profile(device, step_fn(side, 1), path)
                profiles[side] = str(path.with_suffix(".txt"))
        loader_ms = 1000 * framework.loader_s / max(1, framework.trainer.state.step)
        compared = min(len(framework.losses), len(plain.losses)) if plain is not None else 0
        fw_losses = torch.stack(framework.losses[:compared]).tolist() if compared else []
        plain_losses = torch.stack(plain.losses[:compared]).tolist() if compared and plain else []

    tokens_per_step = cfg.tokens_per_step
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = peak_tflops(device, precision, cfg.logging.peak_tflops)

    def side_record(side: str) -> dict[str, Any] | None:
        if side not in sides:
            return None
        rates = [opts.steps * tokens_per_step / t for t in times[side]]
        tps = statistics.median(rates)
        tflops = fpt * tps / 1e12
        other = "plain" if side == "framework" else "framework"
        return {
            "tokens_per_sec": round(tps, 1),
            "tokens_per_sec_per_round": [round(v, 1) for v in rates],
            "step_time_s": round(statistics.median(times[side]) / opts.steps, 6),
            "tflops_per_device": round(tflops, 4),
            "mfu": None if peak is None else round(tflops / peak, 4),
            "peak_memory_gib": round((max(peaks[side]) - base - resident[other]) / GiB, 3) if cuda else None,
            "resident_memory_gib": round(resident[side] / GiB, 3) if cuda else None,
            "scalar_reads_per_step": scalar_reads[side],
        }

    out: dict[str, Any] = {
        "size": preset.stem,
        "parameters": count_parameters(cfg.model),
        "flops_per_token": fpt,
        "precision": precision,
        "zero_stage": cfg.parallel.zero_stage,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum_steps": cfg.grad_accum_steps(1),
        "seq_len": cfg.train.seq_len,
        "tokens_per_step": tokens_per_step,
        "activation_checkpointing": cfg.parallel.activation_checkpointing,
        "compile": bool(getattr(cfg.train, "compile", False)),
        "overrides": overrides,
        "steps_per_round": opts.steps,
        "rounds": opts.rounds,
        "warmup_steps": opts.warmup,
        "peak_tflops": peak,
        "framework": side_record("framework"),
        "plain": side_record("plain"),
        "loader_ms_per_step_on_training_thread": round(loader_ms, 4) if "framework" in sides else None,
    }
    if len(sides) == 2:
        fw, pl = out["framework"], out["plain"]
        out["framework_over_plain"] = round(fw["tokens_per_sec"] / pl["tokens_per_sec"], 4)
        pairs = [p / f for f, p in zip(times["framework"], times["plain"], strict=True)]
        out["framework_over_plain_median_of_rounds"] = round(statistics.median(pairs), 4)
        diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fw_losses, plain_losses, strict=True)]
        out["loss_steps_compared"] = compared
        out["loss_max_rel_diff"] = max(diffs)
        out["first_loss"] = {"framework": fw_losses[0], "plain": plain_losses[0]}
    if profiles:
        out["profiles"] = profiles
    return out


# ---------------------------------------------------------------------------------------------
# The driver: one fresh process per size


def environment() -> dict[str, Any]:
    import deepspeed
    import torch

    device: dict[str, Any] = {"type": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        device.update(
            name=torch.cuda.get_device_name(), count=torch.cuda.device_count(), cuda=torch.version.cuda
        )
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "commit": commit + ("-dirty" if dirty else ""),
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        nargs="+",
        help=f"{', '.join(SIZES)} or a YAML preset (default: GPU 125m 350m 1.3b, CPU tiny)",
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round (default 10)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per side (default 4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")
    parser.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step (default 8)")
    parser.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: the preset's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--side", choices=("both", "framework", "plain"), default="both")
    parser.add_argument(
        "--profile", metavar="DIR", help="also write a torch.profiler table and trace of one step per side"
    )
    parser.add_argument("--output", help="also write the JSON to this file")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.size:  # `--size 125m train.compile=true`: the override is not a size
        rest = [*(s for s in args.size if "=" in s), *rest]
        args.size = [s for s in args.size if "=" not in s] or None
    unknown = [a for a in rest if a.startswith("--") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.in_process:  # the child: one size, this process owns the device
        (size,) = args.size
        print(json.dumps(measure(preset_path(size), overrides, args)), flush=True)
        return 0
    import torch

    sizes = args.size or (["125m", "350m", "1.3b"] if torch.cuda.is_available() else ["tiny"])
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for size in sizes:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *_without_sizes(passed),
            "--size",
            size,
            "--in-process",
        ]
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            results.append({"size": size, "error": f"exit code {proc.returncode} (see stderr)"})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {
        "benchmark": "throughput",
        "command": "python bench/throughput.py " + " ".join(passed),
        **environment(),
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if all("error" not in r for r in results) else 1


def _without_sizes(argv: list[str]) -> list[str]:
    out, skipping = [], False
    for arg in argv:
        if arg == "--size":
            skipping = True
            continue
        if skipping and not arg.startswith("--") and "=" not in arg:
            continue
        skipping = False
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
