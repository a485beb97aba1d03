"""Small training runs shared by the multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# A ~60k-parameter model on short sequences: a handful of steps takes a second or two on CPU.
SMALL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=128",
    "train.seq_len=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.steps=6",
    "train.eval_interval=0",
    "schedule.warmup_steps=2",
    "optim.lr=3e-3",
    "logging.interval=1",
    "logging.tensorboard=false",
    "logging.plot=false",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
]


def small_trainer(overrides: list[str], run_dir: str) -> Any:
    """The real trainer of this rank, built from configs/tiny.yaml + SMALL + overrides."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, *overrides, f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    return build_trainer(cfg, init_distributed())


def train_and_read_metrics(overrides: list[str], run_dir: str) -> list[dict[str, Any]]:
    """Build the real trainer from configs/tiny.yaml + SMALL + overrides, fit, return metrics.jsonl records."""
    import torch.distributed as dist

    small_trainer(overrides, run_dir).fit()
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if dist.get_rank() == 0 else []


def train_compiled(overrides: list[str], run_dir: str) -> tuple[list[dict[str, Any]], int]:
    """train_and_read_metrics with train.compile=true; also how many graphs torch.compile built."""
    from torch._dynamo.utils import counters

    records = train_and_read_metrics(["train.compile=true", *overrides], run_dir)
    return records, counters["stats"]["unique_graphs"]


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r]


def overfit_one_batch(steps: int) -> list[float]:
    """Train the small model through the DeepSpeed engine on one fixed batch; return its losses."""
    import torch

    from pretrain.config import load_config
    from pretrain.data import load_training_data
    from pretrain.model import Transformer
    from pretrain.parallel import build_engine

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *SMALL,
            f"train.steps={steps}",
            "train.micro_batch_size=8",
            "schedule.kind=constant",
            "optim.weight_decay=0",
        ],
        world_size=1,
    )
    samples = load_training_data(cfg.data, cfg.train.seq_len).train[0]
    rows = torch.from_numpy(np.stack([samples[i] for i in range(8)]).astype(np.int64))
    engine, _ = build_engine(cfg, Transformer(cfg.model, seed=0), world_size=1, precision="fp32")
    return [engine.train_step([(rows[:, :-1], rows[:, 1:])]).item() for _ in range(steps)]


def train_with_weights_poisoned_on_rank0(run_dir: str, poison_after_step: int) -> dict[str, Any]:
    """Simulate a numerical blow-up on one rank: NaN into a weight after `poison_after_step` steps."""
    import torch
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import NonFiniteLossError, build_trainer
    from pretrain.train.callbacks import Callback

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, "train.steps=8", "logging.interval=100", "checkpoint.interval=2", f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())

    class Poison(Callback):
        def on_step_end(self, trainer: Any) -> None:
            if trainer.state.step == poison_after_step and dist.get_rank() == 0:
                with torch.no_grad():
                    trainer.engine.module.norm.weight.fill_(float("nan"))

    trainer.callbacks.insert(0, Poison())
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        return {"step": e.step, "message": str(e), "completed": trainer.state.step}
    return {"step": None}


def fail_on_rank(bad_rank: int) -> str:
    """all_ranks_succeed with one failing rank: what each rank sees."""
    import torch.distributed as dist

    from pretrain.parallel.distributed import PeerFailure, all_ranks_succeed

    def work() -> str:
        if dist.get_rank() == bad_rank:
            raise FileNotFoundError("shard-00003.bin is missing")
        return "ok"

    try:
        return all_ranks_succeed(work)
    except PeerFailure:
        return "peer failure"
    except FileNotFoundError as e:
        return f"own error: {e}"


def train_with_poisoned_batch(overrides: list[str], run_dir: str, poison_position: int) -> dict[str, Any]:
    """Train with the output of the final norm turned to NaN during the step whose batch starts at
    global sample position `poison_position` (a bad batch: every rank's gradients become NaN).
    Returns the metrics records, or the NonFiniteLossError raised."""
    return train_with_poisoned_batches(overrides, run_dir, [poison_position])


def train_with_poisoned_batches(overrides: list[str], run_dir: str, positions: list[int]) -> dict[str, Any]:
    """train_with_poisoned_batch for every batch starting at one of `positions`."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import NonFiniteLossError, build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, *overrides, f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())
    batches, poisoned = trainer.train_batches, {"now": False}
    next_step = batches.next_step

    def next_step_watching() -> Any:
        out = next_step()
        poisoned["now"] = batches.last_step_start in positions
        return out

    batches.next_step = next_step_watching  # type: ignore[method-assign]
    trainer.engine.module.norm.register_forward_hook(
        lambda module, args, out: out * float("nan") if poisoned["now"] else out
    )
    result: dict[str, Any] = {"error": None}
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        result["error"] = {"step": e.step, "message": str(e)}
    path = Path(run_dir) / "metrics.jsonl"
    result["records"] = (
        [json.loads(line) for line in path.read_text().splitlines()] if dist.get_rank() == 0 else []
    )
    return result


def train_skipping_batch(overrides: list[str], run_dir: str, position: int) -> list[dict[str, Any]]:
    """Train with the batch at global sample position `position` skipped from the start."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, *overrides, f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())
    trainer.train_batches.skip_batch(position)
    trainer.fit()
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if dist.get_rank() == 0 else []


def train_until_checkpoint_error(overrides: list[str], run_dir: str) -> dict[str, Any]:
    """train_and_read_metrics, returning (on every rank) the CheckpointError that stopped it, if any."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.errors import CheckpointError
    from pretrain.parallel import init_distributed
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, *overrides, f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())
    try:
        trainer.fit()
    except CheckpointError as e:
        return {"error": str(e), "step": trainer.state.step}
    return {"error": None, "step": trainer.state.step}


def shm_buffer_after_init() -> dict[str, bool]:
    """Under run_distributed with LOCAL_SIZE = world size (what the deepspeed launcher sets on one node):
    whether DeepSpeed created this rank's shared-memory all-reduce buffer (this process maps it) and
    whether its name is still in /dev/shm, after init_distributed. It must still work: an
    inference all-reduce goes through it."""
    import deepspeed.comm as ds_comm
    import torch
    import torch.distributed as dist

    from pretrain.deepspeed_compat import shm_allreduce_buffer

    path = shm_allreduce_buffer(dist.get_rank())
    mapped = any(path.name in line for line in Path("/proc/self/maps").read_text().splitlines())
    values = torch.ones(1024) * (dist.get_rank() + 1)
    ds_comm.inference_all_reduce(values)
    return {"mapped": mapped, "named": path.exists(), "sum_ok": bool((values == 3).all())}


def threads_after_close(overrides: list[str], run_dir: str) -> dict[str, list[str]]:
    """The threads alive after fit() (checkpoint writer, watchdog, prefetch) and after Trainer.close()."""
    import threading

    trainer = small_trainer(overrides, run_dir)
    trainer.fit()
    names = lambda: sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())  # noqa: E731
    before = names()
    trainer.close()
    return {"before": before, "after": names()}


def resume_and_compare_with_cache(
    overrides: list[str], run_dir: str, then_train: bool = False
) -> dict[str, Any]:
    """Build the real trainer, which resumes (resharded) from checkpoint.resume in overrides, train
    nothing; return this rank's bytes read from the cache and, per kind, how many of its parameters'
    full fp32 master / moments (gathered through DeepSpeed's public getters) or module weights differ
    from the cache's tensors (read independently: whole, vocabulary padded, TP-sliced, a routed
    expert's EP slice), and how many persistent buffers (MoE router bias) differ. With `then_train`,
    train on to the end and return rank 0's metrics records too."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import load_file

    from pretrain.checkpoint.reshard import last_cache_reads
    from pretrain.config import load_config
    from pretrain.model.names import VOCAB_PARAMETERS, buffer_shapes, is_routed_expert
    from pretrain.parallel import init_distributed
    from pretrain.parallel.pipeline import plain_parameter_name
    from pretrain.parallel.tensor_parallel import shard
    from pretrain.parallel.tp_plan import partition_dim
    from pretrain.train import build_trainer

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [*SMALL, *overrides, f"run.dir={run_dir}"],
        world_size=dist.get_world_size(),
    )
    trainer = build_trainer(cfg, init_distributed())
    ds, ctx = trainer.engine.ds, trainer.engine.ctx
    cache = Path(cfg.checkpoint.resume) / "universal"
    differ = {"fp32": 0, "exp_avg": 0, "exp_avg_sq": 0, "module": 0}
    held = 0  # bytes of fp32 master and moments this rank's optimizer partition holds
    for module_name, param in ds.module.named_parameters():
        name = plain_parameter_name(cfg.model, module_name, ctx.pp > 1)
        expected = load_file(str(cache / f"{name}.safetensors"))
        for kind, full in expected.items():
            if name in VOCAB_PARAMETERS:
                full = torch.cat(
                    [full, full.new_zeros(cfg.padded_vocab_size - full.shape[0], *full.shape[1:])]
                )
            dim = partition_dim(name)
            if ctx.ep > 1 and is_routed_expert(name):
                per_rank = full.shape[0] // ctx.ep
                full = full.narrow(0, ctx.ep_rank * per_rank, per_rank)
            expected[kind] = shard(full, dim, ctx.tp_rank, ctx.tp) if dim is not None and ctx.tp > 1 else full
        got = {
            "fp32": safe_get_full_fp32_param(param),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq"),
        }
        if got["fp32"] is None:  # torch's AdamW without ZeRO: the module weight is the master
            state = ds.optimizer.state[param]
            got = {"fp32": param.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        for kind, value in got.items():
            differ[kind] += not torch.equal(value.float().view_as(expected[kind]), expected[kind])
        held += 12 * _optimizer_partition_numel(param)
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            module = param.detach().clone()
        differ["module"] += not torch.equal(module, expected["fp32"].to(module.dtype).view_as(module))
    buffers = buffer_shapes(cfg.model)
    if buffers:
        cached = load_file(str(cache / "buffers.safetensors"))
        differ["buffers"] = 0
        for module_name, buffer in ds.module.named_buffers():
            name = plain_parameter_name(cfg.model, module_name, ctx.pp > 1)
            if name in buffers:
                differ["buffers"] += not torch.equal(buffer, cached[name])
    reads = last_cache_reads()
    result = {
        "differ": differ,
        "reads": reads.as_dict() if reads else None,
        "held": held,
        "rank": dist.get_rank(),
    }
    if then_train:
        trainer.fit()
        path = Path(run_dir) / "metrics.jsonl"
        result["records"] = (
            [json.loads(line) for line in path.read_text().splitlines()] if dist.get_rank() == 0 else []
        )
    return result


def _optimizer_partition_numel(param: Any) -> int:
    """Elements of `param` in this rank's fp32 optimizer partition (DeepSpeed's ZeRO-3 shard, its
    ZeRO 1-2 fragment, or the whole parameter for torch's AdamW)."""
    if hasattr(param, "ds_id"):
        return int(param.ds_tensor.numel())
    if hasattr(param, "_hp_mapping"):
        return 0 if param._hp_mapping is None else int(param._hp_mapping.lp_fragment_address.numel)
    return int(param.numel())


def resume_expecting_error(overrides: list[str], run_dir: str) -> str:
    """Build the trainer (which resumes) and return the message of the PretrainError it raised."""
    from pretrain.errors import PretrainError

    try:
        small_trainer(overrides, run_dir)
    except PretrainError as e:
        return str(e)
    raise AssertionError("the resume did not fail")


def tensorboard_steps(run_dir, tag):
    """The steps of TensorBoard scalar `tag` that are on disk in run_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def start_ranks(command, world_size=2):
    """`command` as ranks 0..world_size-1 of one world on loopback (the variables a launcher sets)."""
    import os
    import subprocess

    from conftest import REPO
    from pretrain.parallel.distributed import free_port

    world = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return [
        subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **world, "DS_ACCELERATOR": "cpu", "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(world_size)
    ]
