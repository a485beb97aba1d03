"""`Checkpoints`: a run's checkpoint directory, as the training loop sees it.

save   every rank: DeepSpeed's files through the background writer, plus ours (state.json,
       config.yaml, one RNG file per rank); rank 0 commits when all have written.
resume the newest complete checkpoint (or the one named), loaded natively when the layout is the
       saved one (bitwise exact), else resharded through the layout-free cache (`reshard`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pretrain.checkpoint import rng
from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.manifest import (
    check_free_space,
    checkpoint_folders,
    partial_name,
    read_manifest,
)
from pretrain.checkpoint.resume import (
    CONFIG_FILE,
    STATE_FILE,
    STATE_FORMAT,
    ResumePoint,
    resume_changes,
    select_resume_point,
)
from pretrain.checkpoint.signals import StopSignals
from pretrain.checkpoint.universal_info import universal_checkpoint_info
from pretrain.checkpoint.writer import BackgroundWriter, SaveOutcome, SnapshotEngine
from pretrain.config import Config, ConfigError
from pretrain.parallel.schedule import LRSchedule

if TYPE_CHECKING:
    from pretrain.parallel.engine import TrainingEngine
    from pretrain.train.trainer import Trainer

# First save, before any checkpoint size is known: bytes per parameter of module weights (fp32),
# fp32 masters and AdamW's two moments, which bounds every layout we write.
_BYTES_PER_PARAMETER = 16
_FREE_SPACE_MARGIN = 1.1


class Checkpoints:
    """Saving and resuming for one run; every method is called on every rank at the same point."""

    def __init__(
        self,
        cfg: Config,
        engine: TrainingEngine,
        rank: int,
        world_size: int,
        layout: dict[str, Any],
        provenance: dict[str, Any],
        parameters: int,
        signals: StopSignals | None = None,
    ):
        self.cfg, self.engine, self.rank, self.world_size = cfg, engine, rank, world_size
        self.layout, self.provenance = layout, provenance
        self.directory = Path(cfg.run.dir) / "checkpoints"
        self.agreement = StepAgreement(world_size)
        self.signals = signals or StopSignals(rank)
        self.signals.rank = rank
        c = cfg.checkpoint
        self.writer = BackgroundWriter(rank, world_size, c.keep_last, c.keep_every)
        engine.ds.checkpoint_engine = SnapshotEngine(self.writer)
        self._estimate = parameters * _BYTES_PER_PARAMETER
        self.last_stall_seconds = 0.0
        # The same at every save; computed once, off the training thread's save time.
        self._config_yaml = cfg.to_yaml().encode()
        self._universal_info = universal_checkpoint_info(cfg, engine.ctx.pp > 1)

    # ----- storage

    def check_shared_storage(self) -> None:
        """Every rank must see what rank 0 writes: checkpoints on node-local disks cannot be committed."""
        token = None
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            token = f".shared-check-{uuid.uuid4().hex}"
            (self.directory / token).write_text("")
        token = self.agreement.broadcast(token)
        seen = self.agreement.gather((self.directory / token).exists())
        self.agreement.barrier()
        if self.rank == 0:
            (self.directory / token).unlink(missing_ok=True)
        blind = [r for r, ok in enumerate(seen) if not ok]
        if blind:
            raise CheckpointError(
                f"ranks {blind} cannot see files rank 0 writes in {self.directory}: checkpoints need a run.dir on a "
                f"filesystem every node mounts (a shared or parallel filesystem, not a node-local disk)"
            )

    def space_warning(self) -> str | None:
        """A warning when the disk cannot hold the checkpoints retention will keep (estimated from the
        newest checkpoint's size, or 16 bytes per parameter before the first one)."""
        keep = self.cfg.checkpoint.keep_last or 1
        for folder in checkpoint_folders(self.directory):
            try:
                self._estimate = read_manifest(folder).total_bytes
                break
            except CheckpointError:
                continue
        needed, free = self._estimate * (keep + 1), shutil.disk_usage(self.directory).free
        if free >= needed:
            return None
        return (
            f"{self.directory} has {free / 2**30:.2f} GiB free, but checkpoint.keep_last={keep} checkpoints of about "
            f"{self._estimate / 2**30:.2f} GiB each, plus the one being written, need {needed / 2**30:.2f} GiB; a save "
            f"that does not fit stops the run (exit 5) before writing anything"
        )

    # ----- saving

    def save(self, trainer: Trainer) -> None:
        """Start saving the current state (returns once it is copied to host memory unless
        checkpoint.async_save=false). Raises CheckpointError, on every rank, if it cannot start."""
        self.raise_if_failed(self.writer.wait())  # one save in flight: bounded host memory
        step = trainer.state.step
        started = time.perf_counter()
        partial = self.directory / partial_name(step)
        problem = None
        if self.rank == 0:
            try:
                check_free_space(self.directory, int(self._estimate * _FREE_SPACE_MARGIN) + (1 << 20))
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except (CheckpointError, OSError) as e:
                problem = str(e)
        problem = self.agreement.broadcast(problem)
        if problem:
            raise CheckpointError(problem)
        # A synchronous save waits for the commit, so it can write the live tensors without a copy.
        self.writer.begin(step, partial, copy_states=self.cfg.checkpoint.async_save)
        ds = self.engine.ds
        client_state = {
            "step": step,
            "tokens_seen": trainer.state.tokens_seen,
            "universal_checkpoint_info": self._universal_info,
        }
        try:
            ds.save_checkpoint(
                str(self.directory), tag=partial.name, client_state=client_state, save_latest=False
            )
            self.writer.submit_bytes(partial / rng.file_name(self.rank), rng.capture())
            if self.rank == 0:
                state = json.dumps(self._state(trainer), indent=2).encode()
                self.writer.submit_bytes(partial / STATE_FILE, state)
                self.writer.submit_bytes(partial / CONFIG_FILE, self._config_yaml)
        except Exception as e:
            # Not raised here, on this rank alone: the commit fails on every rank and all stop together.
            self.writer.fail(f"preparing the save failed: {e!r}")
        self.writer.finish()
        self.last_stall_seconds = time.perf_counter() - started
        if not self.cfg.checkpoint.async_save:
            self.raise_if_failed(self.writer.wait())

    def _state(self, trainer: Trainer) -> dict[str, Any]:
        ds = self.engine.ds
        scheduler = ds.lr_scheduler.state_dict()
        return {
            "format": STATE_FORMAT,
            "step": trainer.state.step,
            "trainer": trainer.state_dict(),
            "lr_scheduler": {k: v for k, v in scheduler.items() if k != "lr_lambdas"},
            "engine": {
                "global_steps": ds.global_steps,
                "global_samples": ds.global_samples,
                "skipped_steps": ds.skipped_steps,
            },
            "adam_step": _adam_step(ds),
            "layout": self.layout,
            "world_size": self.world_size,
            "provenance": self.provenance,
            "saved_at": time.time(),
        }

    def raise_if_failed(self, outcome: SaveOutcome | None) -> None:
        if outcome is not None and not outcome.ok:
            raise CheckpointError(
                f"the checkpoint of step {outcome.step} could not be written: {outcome.message}. Earlier complete "
                f"checkpoints are untouched; fix the cause and rerun the same command to resume from the newest one"
            )
        if outcome is not None and outcome.ok:
            self._estimate = max(outcome.total_bytes, 1)

    def wait(self, timeout: float | None = None) -> SaveOutcome | None:
        return self.writer.wait(timeout)

    def close(self) -> None:
        self.writer.close()

    # ----- resuming

    def newest_complete(self) -> Path | None:
        """On rank 0's reading of the disk, agreed by all: the newest folder with a valid manifest."""
        found = None
        if self.rank == 0:
            for folder in checkpoint_folders(self.directory):
                try:
                    read_manifest(folder)
                except CheckpointError:
                    continue
                found = folder
                break
        return self.agreement.broadcast(found)

    def select(self, log: Any) -> ResumePoint | None:
        return select_resume_point(self.cfg, self.agreement, self.rank, self.world_size, log)

    def check_changes(self, point: ResumePoint, data_identity: dict[str, Any]) -> list[str]:
        """Raise ConfigError for changes a resume cannot honour; returns notes on the others."""
        problems, notes = resume_changes(
            point.config, self.cfg, point.state["provenance"].get("data", {}), data_identity
        )
        if problems:
            raise ConfigError([f"cannot resume from {point.folder}: {p}" for p in problems])
        return notes

    def restore(self, point: ResumePoint, trainer: Trainer) -> str:
        """Load `point` into the engine and the loop; returns how (native or resharded)."""
        from pretrain.checkpoint.reshard import ensure_universal, load_universal

        ds, state = self.engine.ds, point.state
        same_layout = state["layout"] == self.layout
        if same_layout:
            path, _ = ds.load_checkpoint(
                str(point.folder.parent),
                tag=point.folder.name,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {point.folder}")
            how = "same layout"
        else:
            saved = state["layout"]
            if saved["precision"] == "fp16" and saved["zero_stage"] == 0:
                raise CheckpointError(
                    f"{point.folder} was saved with fp16 and ZeRO-0, whose optimizer state cannot be resharded; "
                    f"resume it in its own layout ({_describe(saved)})"
                )
            cache = ensure_universal(point, self.agreement, self.rank, self.world_size)
            load_universal(ds, self.cfg, self.engine.ctx, cache, int(state["adam_step"]))
            for key, value in state["engine"].items():
                setattr(ds, key, value)
            how = f"resharded from {_describe(state['layout'])}"
        self._restore_schedule(state)
        trainer.load_state_dict(state["trainer"])
        rng_file = point.folder / rng.file_name(self.rank)
        if same_layout and state["world_size"] == self.world_size and rng_file.is_file():
            rng.restore_file(rng_file)
        else:  # another layout: fresh, distinct generators per rank, derived from the resumed step
            seed = self.cfg.seed + 1_000_003 * point.step + self.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return how

    def _restore_schedule(self, state: dict[str, Any]) -> None:
        """The schedule's position comes from the checkpoint; its shape (LR, warmup, decay, steps) and
        the optimizer's hyper-parameters from the current config, which wins on resume."""
        scheduler = self.engine.ds.lr_scheduler
        saved = state["lr_scheduler"]
        scheduler.last_epoch = saved["last_epoch"]
        scheduler._step_count = saved["_step_count"]
        groups = scheduler.optimizer.param_groups
        scheduler.lr_lambdas = [LRSchedule(self.cfg.schedule, self.cfg.train.steps) for _ in groups]
        scheduler.base_lrs = [self.cfg.optim.lr for _ in groups]
        lrs = [
            base * f(scheduler.last_epoch)
            for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        o = self.cfg.optim
        for index, (group, lr) in enumerate(zip(groups, lrs, strict=True)):
            group.update(lr=lr, initial_lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
            group["weight_decay"] = o.weight_decay if index == 0 else 0.0  # matrices, then vectors
        scheduler._last_lr = lrs


def _adam_step(ds: Any) -> int:
    optimizer = ds.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return 0


def _describe(layout: dict[str, Any]) -> str:
    return (
        f"data-parallel {layout['dp']} x tensor-parallel {layout['tp']} x pipeline-parallel {layout['pp']}, "
        f"ZeRO-{layout['zero_stage']}, {layout['precision']}"
    )
