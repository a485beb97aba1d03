"""The training loop. Side concerns (metrics, evaluation, checkpoints, non-finite steps, sinks) are callbacks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.config import Config
from pretrain.data import DistributedBatches
from pretrain.data.loader import Batch
from pretrain.parallel import DistInfo, TrainingEngine, all_reduce_mean
from pretrain.train.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float, detail: str = ""):
        self.step, self.value = step, value
        super().__init__(
            f"the training loss became {value} at step {step}{detail}; stopping before anything is saved from it. "
            f"Lower optim.lr, raise schedule.warmup_steps, set optim.grad_clip, use train.precision=bf16 "
            f"instead of fp16, or set train.on_nonfinite=skip|rollback"
        )


@dataclass
class TrainState:
    """What the loop itself must carry across a restart (the engine and the data loader hold the rest)."""

    step: int = 0
    tokens_seen: int = 0


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
        self._restores = 0  # times the loop state was loaded; a rollback ends the current hook's round

    def fit(self) -> None:
        self._emit("on_train_start")
        try:
            while self.state.step < self.cfg.train.steps:
                loss = self.train_step(self.train_batches.next_step())
                self.state.step += 1
                self.state.tokens_seen += self.cfg.tokens_per_step
                self._pending.append((self.state.step, loss))
                self._emit("on_step_end")
        except BaseException:
            self._emit("on_abort")
            raise
        self._emit("on_train_end")

    def train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns their mean loss (on device, no sync)."""
        self.last_lr = self.engine.lr
        return self.engine.train_step(micro_batches)

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
                raise NonFiniteLossError(step, value)
        self._reduced.extend(zip(steps, values, strict=True))

    def take_losses(self) -> list[tuple[int, float]]:
        """(step, loss averaged over data-parallel ranks) for every step since the last call."""
        self.check_losses()
        losses, self._reduced = self._reduced, []
        return losses

    def grad_norm(self) -> float | None:
        return self.engine.grad_norm()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over train.eval_batches global batches, the same samples every time."""
        assert self.val_batches is not None
        self.val_batches.load_state_dict({"consumed_samples": 0})
        losses = [
            self.engine.eval_loss(self.val_batches.next_step()) for _ in range(self.cfg.train.eval_batches)
        ]
        return float(all_reduce_mean(torch.stack(losses).mean()))

    def log(self, record: dict[str, Any]) -> None:
        self._emit("on_log", record)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "data": self.train_batches.state_dict(),
            "skipped_steps": sorted(self.skipped_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The loop's part of a checkpoint (the engine's is DeepSpeed's); losses of steps after it are dropped."""
        self.state = TrainState(int(state["step"]), int(state["tokens_seen"]))
        self.train_batches.load_state_dict(state["data"])
        self.skipped_steps = set(state.get("skipped_steps", []))
        self._pending = [(s, v) for s, v in self._pending if s <= self.state.step]
        self._reduced = [(s, v) for s, v in self._reduced if s <= self.state.step]
        self._restores += 1
        self._emit("on_restore")

    def _emit(self, hook: str, *args: Any) -> None:
        restores = self._restores
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)
            if hook == "on_step_end" and self._restores != restores:
                return  # rolled back: the step these callbacks were told about no longer exists
