"""The training run's console: Python's `logging`, rank-aware.

One handler on the `pretrain` logger. INFO goes to stdout as the bare message (the progress lines
the docs quote); warnings and errors go to stderr as `warning: ...` / `error: ...`. By default only
rank 0 speaks, because the ranks agree on what they would say; a record logged with
`extra=EVERY_RANK` (a signal one rank received, a problem only that rank saw) is shown on every rank.
With `PRETRAIN_LOG_RANKS=all` every rank logs everything, each line prefixed `[rank N]`, for
debugging a job whose ranks disagree.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "pretrain"
EVERY_RANK = {"every_rank": True}
_LEVEL_WORDS = {logging.WARNING: "warning", logging.ERROR: "error", logging.CRITICAL: "error"}


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (`pretrain.<name>`), for `logging.getLogger(__name__)`-style use."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


class RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or self.all_ranks or bool(getattr(record, "every_rank", False))


class RankFormatter(logging.Formatter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.prefix = f"[rank {rank}] " if all_ranks else ""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        word = _LEVEL_WORDS.get(record.levelno)
        if word:
            message = f"{word}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return self.prefix + message


class _ConsoleHandler(logging.Handler):
    """stdout for information, stderr for warnings and errors; each line flushed at once (a rank's
    output interleaves with the others' and with the launcher's, and a killed job loses nothing)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(rank: int, all_ranks: bool | None = None) -> logging.Logger:
    """Install (or re-install, after the rank became known) the console handler; idempotent."""
    if all_ranks is None:
        all_ranks = os.environ.get("PRETRAIN_LOG_RANKS", "") == "all"
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(old)
    handler = _ConsoleHandler()
    handler.addFilter(RankFilter(rank, all_ranks))
    handler.setFormatter(RankFormatter(rank, all_ranks))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's root handler must not print our lines twice
    return logger


def quiet_libraries() -> None:
    """DeepSpeed logs every engine detail at INFO; ours say what matters."""
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
