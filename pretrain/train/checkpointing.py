"""The loop's side of checkpointing: save cadence, stop signals, and the non-finite-step policy.

Both callbacks run on every rank (their decisions involve collectives) and act on what all ranks
agreed, so every rank saves, stops or rolls back after the same step.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.manager import Checkpoints
from pretrain.checkpoint.resume import ResumePoint, read_point
from pretrain.checkpoint.signals import EXIT_REQUEUE
from pretrain.checkpoint.writer import SaveOutcome
from pretrain.train.callbacks import Callback
from pretrain.train.trainer import NonFiniteLossError

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer

# How long a failing run waits for a save already in flight before it gives up on it.
_ABORT_WAIT_S = 600.0


class Preempted(Exception):
    """All ranks stopped after a stop signal, with a complete checkpoint of the last step on disk."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = (
            f"checkpoint {checkpoint}"
            if checkpoint
            else "the newest checkpoint on disk (nothing trained since)"
        )
        super().__init__(
            f"stopped by {signal_name} after step {step}; {where} is complete. Run the same command again to "
            f"continue (exit code {EXIT_REQUEUE})"
        )


class Checkpointer(Callback):
    """Saves every checkpoint.interval steps, at the end, and when a stop signal arrives; reports
    each save when it has committed. A model whose pending losses are non-finite is never saved."""

    def __init__(self, checkpoints: Checkpoints, interval: int, save_final: bool):
        self.checkpoints, self.interval, self.save_final = checkpoints, interval, save_final
        self.saved_step = -1  # the step of the newest save started (or resumed from)
        self._reported: SaveOutcome | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.checkpoints.signals.install()
        self.saved_step = max(self.saved_step, trainer.state.step if trainer.state.step > 0 else -1)
        # A signal during start-up or resume: nothing was trained since the checkpoint on disk.
        if self.checkpoints.agreement.any_rank(self.checkpoints.signals.stop_requested())[0]:
            name = self.checkpoints.signals.name or "a signal on another rank"
            raise Preempted(name, trainer.state.step, None)

    def on_restore(self, trainer: Trainer) -> None:
        self.saved_step = trainer.state.step

    def on_step_end(self, trainer: Trainer) -> None:
        self._report(trainer)
        outcome = self.checkpoints.writer.finished_outcome()
        stop, failed = self.checkpoints.agreement.any_rank(
            self.checkpoints.signals.stop_requested(), outcome is not None and not outcome.ok
        )
        if failed:  # every rank knows, or is about to learn, the same failed outcome
            self.checkpoints.raise_if_failed(self.checkpoints.wait())
        step = trainer.state.step
        due = (self.interval > 0 and step % self.interval == 0) or (
            self.save_final and step == trainer.cfg.train.steps
        )
        if (due or stop) and step > self.saved_step:
            self.save(trainer)
        if stop:
            outcome = self.checkpoints.wait()
            self.checkpoints.raise_if_failed(outcome)
            self._report(trainer)
            name = self.checkpoints.signals.name or "a signal on another rank"
            raise Preempted(name, step, outcome.path if outcome else None)

    def save(self, trainer: Trainer) -> None:
        trainer.check_losses()  # raises before saving if the model went non-finite
        self.checkpoints.save(trainer)
        self.saved_step = trainer.state.step

    def on_train_end(self, trainer: Trainer) -> None:
        self.checkpoints.raise_if_failed(self.checkpoints.wait())
        self._report(trainer)
        self.checkpoints.signals.uninstall()

    def on_abort(self, trainer: Trainer) -> None:
        # A save already in flight is still worth finishing: the writers agree among themselves.
        # The handlers stay until the process exits, so a late signal cannot replace its exit code.
        self.checkpoints.wait(timeout=_ABORT_WAIT_S)

    def _report(self, trainer: Trainer) -> None:
        outcome = self.checkpoints.writer.finished_outcome()
        if outcome is None or outcome is self._reported or not outcome.ok:
            return
        self._reported = outcome
        trainer.log(
            {
                "step": outcome.step,
                "checkpoint": outcome.path,
                "checkpoint_bytes": outcome.total_bytes,
                "checkpoint_write_s": outcome.write_seconds,
                "checkpoint_stall_s": self.checkpoints.last_stall_seconds,
                "checkpoints_removed": outcome.removed,
            }
        )


class NonFiniteGuard(Callback):
    """train.on_nonfinite: what happens after a step whose global gradient norm was not finite.
    DeepSpeed has already refused that step's update (on every rank alike); this decides whether
    the run fails, goes on, or rolls back to the newest complete checkpoint and skips the batch.
    Under fp16 a skipped step is the loss scaler's routine and not an event (a non-finite loss
    still stops the run when the losses are checked)."""

    def __init__(self, policy: str, max_events: int, checkpoints: Checkpoints, precision: str):
        self.policy, self.max_events, self.checkpoints = policy, max_events, checkpoints
        self.active = precision != "fp16"
        self.events = 0

    def on_step_end(self, trainer: Trainer) -> None:
        if not (self.active and trainer.engine.last_step_skipped):
            return
        step, start = trainer.state.step, trainer.train_batches.last_step_start
        samples = trainer.train_batches.batch_sample_ids(start)
        self.events += 1
        detail = f" (non-finite gradient norm; the batch at sample position {start}: {_sample_list(samples)})"
        if self.policy == "fail" or self.events > self.max_events:
            if self.events > self.max_events:
                detail += f"; {self.events} non-finite steps, more than train.max_nonfinite_events"
            raise NonFiniteLossError(step, float("nan"), detail)
        record: dict[str, Any] = {"step": step, "event": f"nonfinite_{self.policy}", "sample_position": start}
        record["sample_ids"] = samples
        if self.policy == "skip":
            trainer.skipped_steps.add(step)
            trainer.log(record)
            _warn(trainer, f"step {step}: non-finite gradient norm; update skipped{detail}")
            return
        point = self._rollback_point(trainer)
        how = self.checkpoints.restore(point, trainer)
        trainer.train_batches.skip_batch(start)
        record["rolled_back_to"] = point.step
        trainer.log(record)
        _warn(
            trainer,
            f"step {step}: non-finite gradient norm; rolled back to step {point.step} ({how}) and will skip the "
            f"batch at sample position {start}{detail}",
        )

    def _rollback_point(self, trainer: Trainer) -> ResumePoint:
        self.checkpoints.raise_if_failed(self.checkpoints.wait())
        folder = self.checkpoints.newest_complete()
        if folder is None:
            raise NonFiniteLossError(
                trainer.state.step,
                float("nan"),
                " (non-finite gradient norm, and no complete checkpoint to roll back to)",
            )
        return read_point(folder)


def _sample_list(samples: list[tuple[int, int]], limit: int = 8) -> str:
    shown = ", ".join(f"{d}:{i}" for d, i in samples[:limit])
    return shown + (f", ... ({len(samples)} samples)" if len(samples) > limit else "")


def _warn(trainer: Trainer, message: str) -> None:
    if trainer.dist.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


__all__ = ["CheckpointError", "Checkpointer", "NonFiniteGuard", "Preempted"]
