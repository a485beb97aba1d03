"""Side concerns of the training loop, each a callback with four hooks.

Producers (`ThroughputMonitor`, `Evaluator`) make records and hand them to `trainer.log`; sinks
(`JsonlWriter`, `TensorBoardWriter`, `ConsoleProgress`) receive every record in `on_log`.
Sinks are only installed on rank 0; producers run on every rank because they use collectives.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pretrain.train.run_dir import truncate_metrics

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def on_restore(self, trainer: Trainer) -> None:
        """The loop state was just loaded from a checkpoint (resume, or a rollback mid-run)."""

    def on_abort(self, trainer: Trainer) -> None:
        """fit() is leaving through an exception (a signal's save, a failure); release what is held."""


def _due(step: int, interval: int, last_step: int) -> bool:
    return step == last_step or (interval > 0 and step % interval == 0)


class ThroughputMonitor(Callback):
    """Every logging.interval steps (and at steps 1 and last): loss averaged over the interval and over
    data-parallel ranks, LR, grad norm, tokens/s, MFU and ETA."""

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

    def on_train_start(self, trainer: Trainer) -> None:
        self._start = self._since = time.perf_counter()
        self._since_step = trainer.state.step

    def on_restore(self, trainer: Trainer) -> None:
        self._since, self._since_step = time.perf_counter(), trainer.state.step

    def on_step_end(self, trainer: Trainer) -> None:
        step, last = trainer.state.step, trainer.cfg.train.steps
        if not (step == 1 or _due(step, self.interval, last)):
            return
        losses = trainer.take_losses()  # synchronises the device, so the clock below is honest
        now = time.perf_counter()
        steps = step - self._since_step
        step_time = (now - self._since) / steps
        tokens_per_sec = trainer.cfg.tokens_per_step / step_time
        record: dict[str, Any] = {
            "step": step,
            "loss": sum(v for _, v in losses) / len(losses),
            "lr": trainer.last_lr,
            "grad_norm": trainer.grad_norm(),
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
        trainer.log(record)


class Evaluator(Callback):
    """Validation loss and perplexity every train.eval_interval steps and at the end."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.val_batches is None or not _due(
            trainer.state.step, self.interval, trainer.cfg.train.steps
        ):
            return
        loss = trainer.evaluate()
        trainer.log({"step": trainer.state.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})


class JsonlWriter(Callback):
    """One JSON object per record in run.dir/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", buffering=1)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def on_restore(self, trainer: Trainer) -> None:
        """A rollback mid-run: the steps after the checkpoint are trained again, so their records go."""
        self._file.close()
        truncate_metrics(self.path, trainer.state.step)
        self._file = self.path.open("a", buffering=1)

    def on_train_end(self, trainer: Trainer) -> None:
        self._file.close()


class TensorBoardWriter(Callback):
    """The records' numbers as TensorBoard scalars; a resumed run purges events after its step."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, record["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        self.writer.close()


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class ConsoleProgress(Callback):
    """One line per record: step, loss, LR, grad norm, tokens/s, MFU, ETA."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary

    def on_train_start(self, trainer: Trainer) -> None:
        cfg, s = trainer.cfg, self.summary
        print(
            f"model: {s['parameters']:,} parameters, {s['flops_per_token']:,} FLOPs/token; precision {s['precision']}\n"
            f"batch: {cfg.train.global_batch_size} sequences x {cfg.train.seq_len} tokens = {s['tokens_per_step']:,} "
            f"tokens/step = micro {cfg.train.micro_batch_size} x accumulation {s['grad_accum_steps']} x "
            f"data-parallel {s['data_parallel_size']}\n"
            f"layout: data-parallel {s['data_parallel_size']} x tensor-parallel {s['tensor_parallel_size']} x "
            f"pipeline-parallel {s['pipeline_parallel_size']}, ZeRO-{cfg.parallel.zero_stage}; vocabulary "
            f"{cfg.model.vocab_size} padded to {s['padded_vocab_size']}\n"
            f"schedule: {cfg.train.steps} steps, {s['total_tokens']:,} tokens; {cfg.schedule.kind} LR {cfg.optim.lr:g} "
            f"after {cfg.schedule.warmup_steps} warmup steps\n"
            f"data: {', '.join(s['data']['datasets'])}; writing to {cfg.run.dir}",
            flush=True,
        )

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        width = len(str(trainer.cfg.train.steps))
        head = f"step {record['step']:>{width}}/{trainer.cfg.train.steps}"
        if "loss" in record:
            grad = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
            print(
                f"{head} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm {grad} | "
                f"{_si(record['tokens_per_sec'])} tok/s | MFU {mfu} | ETA {format_duration(record['eta_s'])}",
                flush=True,
            )
        elif "val_loss" in record:
            print(
                f"{head} | validation loss {record['val_loss']:.4f} | perplexity {record['val_ppl']:.2f}",
                flush=True,
            )
        elif "checkpoint" in record:
            print(f"{head} | saved checkpoint {record['checkpoint']}", flush=True)


class Plotter(Callback):
    """run.dir/metrics.png at the end of the run."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer: Trainer) -> None:
        from pretrain.plot import plot_run

        print(f"plot of loss, learning rate and throughput: {plot_run(self.run_dir)}", flush=True)
