"""Sinks: every record `trainer.log` receives goes to the console, metrics.jsonl and TensorBoard.
Installed on rank 0 only (the records are the same on every rank)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from pretrain.errors import OutputError
from pretrain.logs import get_logger
from pretrain.train.callbacks.base import PLOT, REPORT, Callback, TrainerView
from pretrain.train.run_dir import truncate_metrics

log = get_logger(__name__)


class JsonlWriter(Callback):
    """One JSON object per record in run.dir/metrics.jsonl."""

    priority = REPORT - 1

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = None

    def on_train_start(self, trainer: TrainerView) -> None:
        self._open()

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if self._file is None:  # a record logged by a callback that runs before this one at train start
            self._open()
        try:
            self._file.write(json.dumps(record) + "\n")  # type: ignore[union-attr]
        except OSError as e:
            raise OutputError(f"the metrics record of step {record.get('step')} to {self.path}", e) from e

    def on_restore(self, trainer: TrainerView) -> None:
        """A rollback mid-run: the steps after the checkpoint are trained again, so their records go."""
        self._close()
        truncate_metrics(self.path, trainer.state.step)
        self._open()

    def on_train_end(self, trainer: TrainerView) -> None:
        self._close()

    def on_close(self, trainer: TrainerView) -> None:  # however the run ends (a stop signal, an error)
        self._close()

    def _open(self) -> None:
        try:
            self._file = self.path.open("a", buffering=1)
        except OSError as e:
            raise OutputError(str(self.path), e) from e

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter(Callback):
    """The records' numbers as TensorBoard scalars; a resumed run purges events after its step."""

    priority = REPORT - 2

    def __init__(self, directory: Path):
        self.directory = directory
        self.writer: Any = None

    def on_train_start(self, trainer: TrainerView) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=trainer.state.step + 1)

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if self.writer is None:  # a record logged before this callback's on_train_start
            self.on_train_start(trainer)
        for key, value in _scalars(record):
            self.writer.add_scalar(key, value, record["step"])
        # Through TensorBoard's writer thread to the file before the next step (records come every
        # logging.interval steps): the watchdog's os._exit and a kill skip every handler, and on a
        # filesystem without append (object stores) the events would wait for a flush up to 2 minutes.
        self.writer.flush()

    def on_train_end(self, trainer: TrainerView) -> None:
        self._close()

    def on_close(self, trainer: TrainerView) -> None:  # however the run ends (a stop signal, an error)
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """The record's numbers, nested dicts as 'outer/inner' tags (e.g. moe_layers/blocks.1/max_over_mean)."""
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            out += _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", value))
    return out


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

    priority = REPORT

    def __init__(self, summary: dict[str, Any], layout: str):
        self.summary, self.layout = summary, layout

    def on_train_start(self, trainer: TrainerView) -> None:
        cfg, s = trainer.cfg, self.summary
        log.info(
            f"model: {s['parameters']:,} parameters{_active(s)}, {s['flops_per_token']:,} FLOPs/token; "
            f"precision {s['precision']}\n"
            f"batch: {cfg.train.global_batch_size} sequences x {cfg.train.seq_len} tokens = {s['tokens_per_step']:,} "
            f"tokens/step = micro {cfg.train.micro_batch_size} x accumulation {s['grad_accum_steps']} x "
            f"data-parallel {s['data_parallel_size']}\n"
            f"layout: {self.layout}; vocabulary {cfg.model.vocab_size} padded to {s['padded_vocab_size']}\n"
            f"schedule: {cfg.train.steps} steps, {s['total_tokens']:,} tokens; {cfg.schedule.kind} LR {cfg.optim.lr:g} "
            f"after {cfg.schedule.warmup_steps} warmup steps\n"
            f"data: {', '.join(s['data']['datasets'])}; writing to {cfg.run.dir}"
        )

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        width = len(str(trainer.cfg.train.steps))
        head = f"step {record['step']:>{width}}/{trainer.cfg.train.steps}"
        if "loss" in record:
            grad = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
            log.info(
                f"{head} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm {grad} | "
                f"{_si(record['tokens_per_sec'])} tok/s | MFU {mfu} | ETA {format_duration(record['eta_s'])}"
            )
        elif "val_loss" in record:
            log.info(
                f"{head} | validation loss {record['val_loss']:.4f} | perplexity {record['val_ppl']:.2f}"
            )
        elif "moe_aux_loss" in record:
            log.info(
                f"{head} | MoE aux loss {record['moe_aux_loss']:.4f} | z-loss {record['moe_z_loss']:.3f} | "
                f"busiest expert {record['moe_max_load_over_mean']:.2f}x mean | idle experts "
                f"{record['moe_idle_experts']} | dropped {record['moe_dropped']}"
            )
        elif "checkpoint" in record:
            log.info(f"{head} | saved checkpoint {record['checkpoint']}")


def _active(summary: dict[str, Any]) -> str:
    active = summary.get("active_parameters", summary["parameters"])
    return "" if active == summary["parameters"] else f" ({active:,} active per token)"


class Plotter(Callback):
    """run.dir/metrics.png at the end of the run."""

    priority = PLOT

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer: TrainerView) -> None:
        from pretrain.plot import plot_run

        try:
            path = plot_run(self.run_dir)
        except OSError as e:
            raise OutputError(f"the plot in {self.run_dir}", e) from e
        log.info(f"plot of loss, learning rate and throughput: {path}")
