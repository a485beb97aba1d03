"""The training loop. Side concerns (metrics, evaluation, checkpoints, non-finite steps, sinks) are
callbacks, called in the order of their declared priority (`pretrain.train.callbacks.base`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.checkpoint.rng import RandomState
from pretrain.checkpoint.state import RunState, Stateful
from pretrain.config import Config
from pretrain.data import DistributedBatches
from pretrain.data.loader import Batch, SkippedBatches
from pretrain.errors import NonFiniteLossError, nonfinite_fixes
from pretrain.parallel import DistInfo, TrainingEngine, all_reduce_mean
from pretrain.parallel.expert_parallel import expert_weights
from pretrain.train.callbacks.base import Callback, ordered


@dataclass
class TrainState:
    """Where the loop is (the engine and the data loader hold the rest of the run's position)."""

    step: int = 0
    tokens_seen: int = 0


@dataclass
class Rollback:
    """A callback's request to go back to a checkpoint, carried out by the loop between steps."""

    restore: Callable[[], str]  # loads the checkpoint into the run's state; returns how
    skip_batch: int  # global sample position of the batch never to train on again
    announce: Callable[[str], None]  # told how the restore went, once the loop goes on from there


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine: TrainingEngine,
        train_batches: DistributedBatches,
        val_batches: DistributedBatches | None,
        dist: DistInfo,
        callbacks: list[Callback],
    ):
        self.cfg, self.engine, self.dist = cfg, engine, dist
        self.train_batches, self.val_batches = train_batches, val_batches
        self.callbacks = callbacks
        self.state = TrainState()
        self.last_lr = 0.0
        self.skipped_steps: set[int] = set()  # steps whose update was skipped on purpose (non-finite)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, local loss) not yet reduced over ranks
        self._reduced: list[tuple[int, float]] = []  # reduced, not yet taken by the metrics
        self._rollback: Rollback | None = None
        self.unverified_resume: str | None = None  # set by the builder: see errors.nonfinite_fixes
        self.run_state = self._register_state()

    def _register_state(self) -> RunState:
        """Everything that survives a restart, in the order it is restored (RNG last: nothing after
        it draws random numbers)."""
        state = RunState()
        state.register("engine", self.engine)
        if (experts := expert_weights(self.engine.module)) is not None:
            state.register("experts", experts, per_rank=True)
        state.register("lr_schedule", self.engine.lr_scheduler)
        state.register("loop", self)
        state.register("data", self.train_batches)
        # The batches it chose to skip stay skipped after a rollback to a checkpoint older than the skip.
        state.register(
            "data.skipped_batches", SkippedBatches(self.train_batches), rolled_back=False, required=False
        )
        for callback in self.callbacks:
            name = getattr(callback, "state_name", None)
            if name is not None and isinstance(callback, Stateful):
                # The run's history (e.g. how many non-finite steps it met) survives rollbacks.
                state.register(f"callback.{name}", callback, rolled_back=False, required=False)
        state.register("rng", RandomState(self.cfg.seed, self.dist.rank), per_rank=True)
        return state

    def fit(self) -> None:
        self.callbacks = ordered(self.callbacks)
        self._emit("on_train_start")
        try:
            while self.state.step < self.cfg.train.steps:
                loss = self.train_step(self.train_batches.next_step())
                self.state.step += 1
                self.state.tokens_seen += self.cfg.tokens_per_step
                self._pending.append((self.state.step, loss))
                self._emit("on_step_end")
                if self._rollback is not None:
                    self._carry_out_rollback()
        except BaseException:
            self._emit("on_abort")
            raise
        self._emit("on_train_end")

    def close(self) -> None:
        """Before the process exits, however fit() ended: the callbacks' threads in their order (the
        checkpoint writer, then the watchdog), then the loaders'."""
        for callback in ordered(self.callbacks):
            callback.on_close(self)
        for batches in (self.train_batches, self.val_batches):
            if batches is not None:
                batches.close()

    def train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns their mean loss (on device, no sync)."""
        self.last_lr = self.engine.lr
        return self.engine.train_step(micro_batches)

    # ----- what callbacks may ask of the loop

    def check_losses(self) -> None:
        """Reduce every pending step's loss over data-parallel ranks (one collective, one host sync)
        and raise NonFiniteLossError naming the first bad step. Cheap to call again."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        values = all_reduce_mean(torch.stack([loss.float() for _, loss in self._pending])).tolist()
        self._pending.clear()
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value) and step not in self.skipped_steps:
                fixes = nonfinite_fixes(self.cfg.train.on_nonfinite, unverified_resume=self.unverified_resume)
                raise NonFiniteLossError(step, value, fixes=fixes)
        self._reduced.extend(zip(steps, values, strict=True))

    def take_losses(self) -> list[tuple[int, float]]:
        """(step, loss averaged over data-parallel ranks) for every step since the last call."""
        self.check_losses()
        losses, self._reduced = self._reduced, []
        return losses

    def take_reduced_losses(self) -> list[tuple[int, float]]:
        """What `take_losses` returns, less the steps not yet reduced: no collective."""
        losses, self._reduced = self._reduced, []
        return losses

    def grad_norm(self) -> float | None:
        return self.engine.grad_norm()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over train.eval_batches global batches, the same samples every time."""
        assert self.val_batches is not None
        self.val_batches.load_state_dict({**self.val_batches.state_dict(), "consumed_samples": 0})
        losses = [
            self.engine.eval_loss(self.val_batches.next_step()) for _ in range(self.cfg.train.eval_batches)
        ]
        return float(all_reduce_mean(torch.stack(losses).mean()))

    def log(self, record: dict[str, Any]) -> None:
        self._emit("on_log", record)

    def excuse_step(self, step: int) -> None:
        """The update of `step` was skipped on purpose: its non-finite loss does not stop the run."""
        self.skipped_steps.add(step)

    def request_rollback(self, rollback: Rollback) -> None:
        """Go back to a checkpoint once the current hook returns; the callbacks after it are not told
        about a step that no longer exists."""
        self._rollback = rollback

    # ----- Stateful: the loop's part of a checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": sorted(self.skipped_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The loop's position; losses of steps after it are dropped."""
        self.state = TrainState(int(state["step"]), int(state["tokens_seen"]))
        self.skipped_steps = set(state.get("skipped_steps", []))
        self._pending = [(s, v) for s, v in self._pending if s <= self.state.step]
        self._reduced = [(s, v) for s, v in self._reduced if s <= self.state.step]

    # ----- internals

    def _carry_out_rollback(self) -> None:
        rollback, self._rollback = self._rollback, None
        assert rollback is not None
        how = rollback.restore()
        self.train_batches.skip_batch(rollback.skip_batch)
        self._emit("on_restore")
        rollback.announce(how)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)
            if self._rollback is not None:
                return  # the step the rest would be told about is about to be undone
