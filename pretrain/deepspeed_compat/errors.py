"""The error every use of a DeepSpeed internal raises when the installed DeepSpeed lacks it."""

from __future__ import annotations

from typing import Any

from pretrain.errors import PretrainError

TESTED_DEEPSPEED = ("0.19.8", "0.20")  # [lowest tested, first untested)


class DeepSpeedIncompatible(PretrainError, RuntimeError):
    """The installed DeepSpeed lacks an internal this framework relies on."""

    def __init__(self, internal: str, where: str):
        import deepspeed

        low, high = TESTED_DEEPSPEED
        super().__init__(
            f"DeepSpeed {deepspeed.__version__} has no {internal} ({where}); this framework is tested with "
            f"DeepSpeed >= {low}, < {high}: install one (pip install 'deepspeed>={low},<{high}'), or adapt "
            f"pretrain/deepspeed_compat/ and run `make check`"
        )


def require(obj: Any, attribute: str, where: str) -> Any:
    if not hasattr(obj, attribute):
        raise DeepSpeedIncompatible(f"attribute {type(obj).__name__}.{attribute}", where)
    return getattr(obj, attribute)
