"""Producers of records: throughput and loss, and validation. They run on every rank (their numbers
are reduced over the ranks) and hand each record to `trainer.log`, which reaches the sinks."""

from __future__ import annotations

import math
import time
from typing import Any

from pretrain.train.callbacks.base import EVALUATE, MEASURE, Callback, TrainerView, due


class ThroughputMonitor(Callback):
    """Every logging.interval steps (and at steps 1 and last): loss averaged over the interval and over
    data-parallel ranks, LR, grad norm, tokens/s, MFU and ETA."""

    priority = MEASURE

    def __init__(
        self,
        interval: int,
        flops_per_token: int,
        peak_tflops: float | None,
        world_size: int,
        datasets: list[str],
    ):
        self.interval, self.flops_per_token, self.datasets = interval, flops_per_token, datasets
        self.peak_flops = None if peak_tflops is None else peak_tflops * 1e12 * world_size
        self._since: float = 0.0
        self._since_step = 0
        self._start: float = 0.0

    def on_train_start(self, trainer: TrainerView) -> None:
        self._start = self._since = time.perf_counter()
        self._since_step = trainer.state.step

    def on_restore(self, trainer: TrainerView) -> None:
        self._since, self._since_step = time.perf_counter(), trainer.state.step

    def on_step_end(self, trainer: TrainerView) -> None:
        step, last = trainer.state.step, trainer.cfg.train.steps
        if not (step == 1 or due(step, self.interval, last)):
            return
        losses = trainer.take_losses()  # synchronises the device, so the clock below is honest
        trainer.log(self._record(trainer, losses, trainer.grad_norm()))

    def on_abort(self, trainer: TrainerView) -> None:
        """The steps since the last record whose losses the ranks have already agreed on (a stop
        signal's save checks them): logged now, or never (the resumed run starts after them). No
        collective: a failing rank may be why the loop ends."""
        losses = trainer.take_reduced_losses()
        if losses and losses[-1][0] > self._since_step:
            trainer.log(self._record(trainer, losses, None))

    def _record(
        self, trainer: TrainerView, losses: list[tuple[int, float]], grad_norm: float | None
    ) -> dict[str, Any]:
        step, last = losses[-1][0], trainer.cfg.train.steps
        now = time.perf_counter()
        steps = max(1, step - self._since_step)
        step_time = (now - self._since) / steps
        tokens_per_sec = trainer.cfg.tokens_per_step / step_time
        record: dict[str, Any] = {
            "step": step,
            "loss": sum(v for _, v in losses) / len(losses),
            "lr": trainer.last_lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "mfu": None
            if self.peak_flops is None
            else self.flops_per_token * tokens_per_sec / self.peak_flops,
            "tokens_seen": trainer.state.tokens_seen,
            "step_time_s": step_time,
            "elapsed_s": now - self._start,
            "eta_s": step_time * (last - step),
        }
        if len(self.datasets) > 1:  # realised blend: each dataset's share of all samples so far
            consumed = trainer.train_batches.consumed_per_dataset()
            record["data_share"] = {
                n: c / sum(consumed) for n, c in zip(self.datasets, consumed, strict=True)
            }
        self._since, self._since_step = now, step
        return record


class Evaluator(Callback):
    """Validation loss and perplexity every train.eval_interval steps and at the end."""

    priority = EVALUATE

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer: TrainerView) -> None:
        if trainer.val_batches is None or not due(trainer.state.step, self.interval, trainer.cfg.train.steps):
            return
        loss = trainer.evaluate()
        trainer.log({"step": trainer.state.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
