"""`CheckpointStore`: a run's checkpoint directory, as the training loop sees it.

save    every rank: DeepSpeed's files through the background writer, plus the run's other parts
        (`pretrain.checkpoint.state`: state.json from rank 0, per-rank files) and config.yaml;
        rank 0 commits when all have written.
restore the newest complete checkpoint (or the one named) into the engine and the run's parts,
        natively when the layout is the saved one (bitwise exact), else resharded through the
        layout-free cache (`reshard`).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.manifest import (
    apply_retention,
    check_free_space,
    checkpoint_folders,
    partial_name,
    read_manifest,
)
from pretrain.checkpoint.resume import CONFIG_FILE, ResumePoint, resume_changes, select_resume_point
from pretrain.checkpoint.save_clock import SaveClock
from pretrain.checkpoint.signals import StopSignals
from pretrain.checkpoint.state import (
    STATE_FILE,
    RunState,
    decode_rank_state,
    encode_rank_state,
    rank_file,
    state_document,
)
from pretrain.checkpoint.universal_info import universal_checkpoint_info
from pretrain.checkpoint.writer import BackgroundWriter, SaveOutcome, SnapshotEngine, writer_timeout
from pretrain.config import Config
from pretrain.deepspeed_compat import install_checkpoint_engine
from pretrain.errors import CheckpointError, ConfigError
from pretrain.logs import get_logger
from pretrain.parallel.engine import TrainingEngine
from pretrain.parallel.topology import describe_layout

if TYPE_CHECKING:
    from pretrain.checkpoint.cache_reader import CacheReads

# First save, before any checkpoint size is known: bytes per parameter of module weights (fp32),
# fp32 masters and AdamW's two moments, which bounds every layout we write.
_BYTES_PER_PARAMETER = 16
_FREE_SPACE_MARGIN = 1.1

log = get_logger(__name__)


class CheckpointStore:
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
        self.save_clock = SaveClock()
        self.writer = BackgroundWriter(
            rank, world_size, c.keep_last, c.keep_every, writer_timeout(c.save_timeout), self.save_clock
        )
        install_checkpoint_engine(engine.ds, SnapshotEngine(self.writer))
        self._estimate = parameters * _BYTES_PER_PARAMETER
        self.last_stall_seconds = 0.0
        # The checkpoint this process resumed from without reading its checksums (checkpoint.verify=size):
        # named by the hint of a non-finite step, which is what a silently corrupt state leads to.
        self.unverified_resume: str | None = None
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

    def save(self, state: RunState, step: int) -> None:
        """Start saving the run's state at `step` (returns once it is copied to host memory unless
        checkpoint.async_save=false). Raises CheckpointError, on every rank, if it cannot start. Its
        time is the save's, not the step's (`SaveClock`)."""
        with self.save_clock.training_thread():
            self._save(state, step)

    def _save(self, state: RunState, step: int) -> None:
        self.raise_if_failed(self.writer.wait())  # one save in flight: bounded host memory
        started = time.perf_counter()
        partial = self._prepare_folder(step)
        # A synchronous save waits for the commit, so it can write the live tensors without a copy.
        self.writer.begin(step, partial, copy_states=self.cfg.checkpoint.async_save)
        try:
            self._submit(state, step, partial)
        except Exception as e:
            # Not raised here, on this rank alone: the commit fails on every rank and all stop together.
            self.writer.fail(f"preparing the save failed: {e!r}")
        self.writer.finish()
        self.last_stall_seconds = time.perf_counter() - started
        if not self.cfg.checkpoint.async_save:
            self.raise_if_failed(self.writer.wait())

    def _prepare_folder(self, step: int) -> Path:
        """Rank 0 makes sure the save fits and creates its folder; every rank learns the outcome."""
        partial = self.directory / partial_name(step)
        problem = None
        if self.rank == 0:
            try:
                needed = int(self._estimate * _FREE_SPACE_MARGIN) + (1 << 20)
                shutil.rmtree(partial, ignore_errors=True)
                if shutil.disk_usage(self.directory).free < needed:
                    self._make_room()
                check_free_space(self.directory, needed, self.cfg.checkpoint.keep_last)
                partial.mkdir(parents=True)
            except (CheckpointError, OSError) as e:
                problem = str(e)
        problem = self.agreement.broadcast(problem)
        if problem:
            raise CheckpointError(problem)
        return partial

    def _make_room(self) -> None:
        """Space is short: delete now what retention would delete once this save commits, so that
        lowering checkpoint.keep_last helps a run whose disk is full. The newest complete checkpoint
        stays until the new one has replaced it (keep_last=1 needs room for two)."""
        keep_last, keep_every = self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every
        if keep_last <= 0:
            return  # keep everything: nothing may go
        for removed in apply_retention(self.directory, max(1, keep_last - 1), keep_every):
            log.warning(
                f"disk space is short: removed {removed} before saving (checkpoint.keep_last={keep_last})"
            )

    def _submit(self, state: RunState, step: int, partial: Path) -> None:
        shared = state.shared_state()
        # DeepSpeed keeps these beside its own files, where its tools (and our converter) read them.
        client_state = {
            "step": step,
            "tokens_seen": shared["loop"]["tokens_seen"],
            "universal_checkpoint_info": self._universal_info,
        }
        self.engine.save_files(str(self.directory), partial.name, client_state)
        for name, part_state in state.rank_state().items():
            self.writer.submit_bytes(partial / rank_file(name, self.rank), encode_rank_state(part_state))
        if self.rank == 0:
            document = state_document(step, shared, self.layout, self.world_size, self.provenance)
            self.writer.submit_bytes(partial / STATE_FILE, json.dumps(document, indent=2).encode())
            self.writer.submit_bytes(partial / CONFIG_FILE, self._config_yaml)

    def raise_if_failed(self, outcome: SaveOutcome | None) -> None:
        if outcome is not None and not outcome.ok:
            raise CheckpointError(
                f"the checkpoint of step {outcome.step} could not be written: {outcome.message}. Earlier complete "
                f"checkpoints are untouched; fix the cause and rerun the same command to resume from the newest one"
            )
        if outcome is not None and outcome.ok:
            self._estimate = max(outcome.total_bytes, 1)

    def wait(self, timeout: float | None = None) -> SaveOutcome | None:
        with self.save_clock.training_thread():
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

    def select(self, log: Callable[[str], None]) -> ResumePoint | None:
        return select_resume_point(self.cfg, self.agreement, self.rank, self.world_size, log)

    def check_changes(self, point: ResumePoint, data_identity: dict[str, Any]) -> list[str]:
        """Raise ConfigError for changes a resume cannot honour; returns notes on the others."""
        problems, notes = resume_changes(
            point.config, self.cfg, point.state["provenance"].get("data", {}), data_identity
        )
        if problems:
            raise ConfigError([f"cannot resume from {point.folder}: {p}" for p in problems])
        return notes

    def restore(self, point: ResumePoint, state: RunState, rollback: bool = False) -> str:
        """Load `point` into the engine and every part of `state`; returns how (native or resharded).
        A rollback keeps the parts that record the run's history."""
        document = point.state
        same_layout = document["layout"] == self.layout
        if same_layout:
            if not self.engine.load_files(str(point.folder.parent), point.folder.name):
                raise CheckpointError(f"DeepSpeed could not load {point.folder}")
            how = "same layout"
        else:
            reads = self._reshard_into_engine(point)
            how = f"resharded from {_describe(document['layout'])}; rank {self.rank} {reads.describe()}"
        rank_states = {}
        if same_layout and document["world_size"] == self.world_size:
            for name in state.per_rank_names():
                path = point.folder / rank_file(name, self.rank)
                if path.is_file():
                    rank_states[name] = decode_rank_state(path)
        state.load(document["parts"], rank_states, point.step, rollback=rollback)
        if not rollback and self.cfg.checkpoint.verify == "size":
            self.unverified_resume = str(point.folder)
        return how

    def _reshard_into_engine(self, point: ResumePoint) -> CacheReads:
        from pretrain.checkpoint.reshard import ensure_universal, load_universal

        saved = point.state["layout"]
        if saved["precision"] == "fp16" and saved["zero_stage"] == 0:
            raise CheckpointError(
                f"{point.folder} was saved with fp16 and ZeRO-0, whose optimizer state cannot be resharded; "
                f"resume it in its own layout ({_describe(saved)})"
            )
        cache = ensure_universal(point, self.agreement, self.rank, self.world_size)
        adam_step = int(point.state["parts"]["engine"]["adam_step"])
        return load_universal(self.engine.ds, self.cfg, self.engine.ctx, cache, adam_step)


def _describe(layout: dict[str, Any]) -> str:
    return describe_layout(
        layout["dp"],
        layout["tp"],
        layout["pp"],
        layout["zero_stage"],
        layout["precision"],
        layout.get("ep", 1),
    )
