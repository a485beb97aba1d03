"""train.on_nonfinite: what happens after a step whose global gradient norm was not finite."""

from __future__ import annotations

from typing import Any

from pretrain.checkpoint.resume import ResumePoint, read_point
from pretrain.checkpoint.store import CheckpointStore
from pretrain.errors import NonFiniteLossError, nonfinite_fixes, with_unverified_resume
from pretrain.logs import get_logger
from pretrain.train.callbacks.base import GUARD, Callback, TrainerView
from pretrain.train.trainer import Rollback

log = get_logger(__name__)


class NonFiniteGuard(Callback):
    """DeepSpeed has already refused the step's update (on every rank alike); this decides whether
    the run fails, goes on, or rolls back to the newest complete checkpoint and skips the batch.
    Under fp16 a skipped step is the loss scaler's routine and not an event (a non-finite loss
    still stops the run when the losses are checked).

    Its count of events is run state: checkpointed, so train.max_nonfinite_events holds for the
    run across requeues, and kept through rollbacks (registered with rolled_back=False)."""

    priority = GUARD
    state_name = "nonfinite_guard"

    def __init__(self, policy: str, max_events: int, store: CheckpointStore, precision: str):
        self.policy, self.max_events, self.store = policy, max_events, store
        self.active = precision != "fp16"
        self.events = 0

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = int(state["events"])

    def on_step_end(self, trainer: TrainerView) -> None:
        if not (self.active and trainer.engine.last_step_skipped):
            return
        step, start = trainer.state.step, trainer.train_batches.last_step_start
        samples = trainer.train_batches.batch_sample_ids(start)
        self.events += 1
        detail = f" (the batch at sample position {start}: {_sample_list(samples)})"
        if self.policy == "fail" or self.events > self.max_events:
            exhausted = self.events > self.max_events
            if exhausted:
                detail += f"; {self.events} non-finite steps, more than train.max_nonfinite_events"
            raise self._error(trainer, detail, nonfinite_fixes(self.policy, exhausted=exhausted))
        record: dict[str, Any] = {"step": step, "event": f"nonfinite_{self.policy}", "sample_position": start}
        record["sample_ids"] = samples
        if self.policy == "skip":
            trainer.excuse_step(step)
            trainer.log(record)
            log.warning(f"step {step}: non-finite gradient norm; update skipped{detail}")
            return
        point = self._rollback_point(trainer)

        def announce(how: str) -> None:
            trainer.log({**record, "rolled_back_to": point.step})
            log.warning(
                f"step {step}: non-finite gradient norm; rolled back to step {point.step} ({how}) and will skip "
                f"the batch at sample position {start}{detail}"
            )

        restore = lambda: self.store.restore(point, trainer.run_state, rollback=True)  # noqa: E731
        trainer.request_rollback(Rollback(restore, start, announce))

    def _rollback_point(self, trainer: TrainerView) -> ResumePoint:
        self.store.raise_if_failed(self.store.wait())
        folder = self.store.newest_complete()
        if folder is None:
            fixes = (
                "train.on_nonfinite=rollback needs a checkpoint from before the bad step: lower checkpoint.interval "
                "(and keep checkpoint.keep_last >= 1), or use train.on_nonfinite=skip to skip the batch in place"
            )
            raise self._error(trainer, ", and no complete checkpoint to roll back to", fixes)
        return read_point(folder)

    def _error(self, trainer: TrainerView, detail: str, fixes: str) -> NonFiniteLossError:
        """The gradient norm is what was non-finite (the loss may have been finite: it is not read here,
        which would cost a host sync every step)."""
        norm = trainer.grad_norm()
        return NonFiniteLossError(
            trainer.state.step,
            float("nan") if norm is None else norm,
            detail,
            quantity="the global gradient norm",
            fixes=with_unverified_resume(fixes, self.store.unverified_resume),
        )


def _sample_list(samples: list[tuple[int, int]], limit: int = 8) -> str:
    shown = ", ".join(f"{d}:{i}" for d, i in samples[:limit])
    return shown + (f", ... ({len(samples)} samples)" if len(samples) > limit else "")
