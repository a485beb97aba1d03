"""DeepSpeed engine construction, and the one interface the training loop drives it through.

`TrainingEngine` hides whether DeepSpeed's plain engine (data and tensor parallelism, ZeRO 0-3) or its
pipeline engine (1F1B over stages, ZeRO 0-1) runs the step: the loop hands it one optimizer step's
micro-batches and gets back the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain import deepspeed_compat as compat
from pretrain.config import Config, ConfigError
from pretrain.optim import LRScheduler, build_optimizer
from pretrain.parallel.deepspeed_config import build_deepspeed_config, we_clip_gradients
from pretrain.parallel.topology import ParallelContext, single_process_context

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' means bf16 where the GPU computes it natively, else fp32 (CPUs, pre-Ampere GPUs)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def counts_towards_norm(param: nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank adds `param`'s gradient to the global norm: every tensor-parallel shard
    counts, a replicated parameter once (on TP rank 0), and the last stage's copy of a tied embedding
    not at all (the first stage counts it)."""
    if compat.is_pipeline_tied_copy(param):
        return False
    return compat.is_tensor_parallel(param) or tp_rank == 0


class GlobalNormClipper:
    """Global gradient-norm clipping for fp32 without ZeRO, as an optimizer step pre-hook.

    DeepSpeed's own fp32 clipping (`clip_grad_norm_` with an mpu) keeps replicated parameters only on
    model-parallel rank 0, which under pipeline parallelism is the first stage alone, and counts a
    tied embedding twice; so for that case we clip here (DeepSpeed's clipping is switched off).
    With ZeRO or bf16 DeepSpeed's optimizers count correctly and clip themselves.
    """

    def __init__(self, params: list[nn.Parameter], max_norm: float, ctx: ParallelContext):
        self.params, self.max_norm, self.ctx = params, max_norm, ctx
        self.last_norm: torch.Tensor | None = None

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [
            p.grad for p in self.params if p.grad is not None and counts_towards_norm(p, self.ctx.tp_rank)
        ]
        device = self.params[0].device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            squares = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum()
        if self.ctx.model_parallel_group is not None:
            dist.all_reduce(squares, group=self.ctx.model_parallel_group)
        norm = squares.sqrt()
        self.last_norm = norm
        # As DeepSpeed's own optimizers do: a non-finite norm skips the update (AdamW passes over
        # parameters without a gradient), and `overflow` tells the engine not to advance the schedule.
        optimizer.overflow = not bool(torch.isfinite(norm))
        if optimizer.overflow:
            for p in self.params:
                p.grad = None
            return
        if self.max_norm > 0:
            scale = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)


class TrainingEngine:
    """One optimizer step, evaluation, LR and gradient norm, whatever the layout."""

    def __init__(self, ds_engine: Any, ctx: ParallelContext, clipper: GlobalNormClipper | None):
        self.ds, self.ctx, self.clipper = ds_engine, ctx, clipper
        self.device = ds_engine.device
        self.last_step_skipped = False  # the last step's update was not applied (non-finite gradients)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def pipelined(self) -> bool:
        return self.ctx.pp > 1

    def train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches. Returns their mean loss, on the device,
        without a host sync (pipelines: already averaged over data-parallel ranks, on every stage).
        DeepSpeed skips the update of a step whose global gradient norm is not finite, on every rank
        alike; `last_step_skipped` says whether it did (a counter DeepSpeed keeps on the host)."""
        skipped = compat.skipped_steps(self.ds)
        if self.pipelined:
            loss = self.ds.train_batch(data_iter=iter(micro_batches))
        else:
            losses = []
            for tokens, labels in micro_batches:
                # Asynchronous from page-locked memory (see DistributedBatches), a plain copy otherwise.
                tokens = tokens.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                out = self.ds(tokens, labels)
                self.ds.backward(out)
                self.ds.step()  # DeepSpeed applies the update only at the accumulation boundary
                losses.append(out.detach())
            loss = torch.stack(losses).mean()
        self.last_step_skipped = compat.skipped_steps(self.ds) > skipped
        return loss

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> torch.Tensor:
        if self.pipelined:
            return self.ds.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
        self.ds.eval()
        losses = [self.ds(t.to(self.device), y.to(self.device)).float() for t, y in micro_batches]
        self.ds.train()
        return torch.stack(losses).mean()

    @property
    def lr_scheduler(self) -> LRScheduler:
        return self.ds.lr_scheduler

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last step (before clipping), over every shard and stage."""
        norm = self.clipper.last_norm if self.clipper is not None else self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ----- Stateful: DeepSpeed's counters (the weights and optimizer state go into DeepSpeed's files)

    def state_dict(self) -> dict[str, Any]:
        return {**compat.engine_counters(self.ds), "adam_step": compat.adam_step(self.ds.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """DeepSpeed's counters (its own load restores them; a resharded resume does not)."""
        compat.set_engine_counters(self.ds, state)

    def save_files(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint files of this rank (module, optimizer partitions, pipeline layers)."""
        self.ds.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load_files(self, directory: str, tag: str) -> bool:
        """Load DeepSpeed's files of checkpoint `tag` saved in this very layout; False if it found none."""
        path, _ = self.ds.load_checkpoint(
            directory,
            tag=tag,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        return path is not None


def build_engine(
    cfg: Config,
    model: nn.Module,
    world_size: int,
    precision: str,
    ctx: ParallelContext | None = None,
) -> tuple[TrainingEngine, dict[str, Any]]:
    """Wrap this rank's `model` (see `parallelize_model`) in a DeepSpeed engine; returns it and the
    DeepSpeed config it was given."""
    import deepspeed

    ctx = ctx or single_process_context()
    ds_config = build_deepspeed_config(cfg, world_size, precision)
    problems = cfg.parallel.data_type_problems(cfg.train, precision)  # 'auto' resolved only now
    if problems:
        raise ConfigError(problems)
    optimizer = build_optimizer(model, cfg.optim, offload=cfg.parallel.offload_optimizer != "none")
    clipper = None
    if we_clip_gradients(cfg, precision):
        clipper = GlobalNormClipper(
            [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip, ctx
        )
        optimizer.register_step_pre_hook(clipper)
    scheduler = LRScheduler(optimizer, cfg.optim, cfg.schedule, cfg.train.steps)
    mpu = ctx.grid if ctx.pp == 1 else None  # a PipelineModule brings its own
    with compat.expert_aware_engines(ctx.ep > 1):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            mpu=mpu,
            dist_init_required=False,
        )
    return TrainingEngine(engine, ctx, clipper), ds_config
