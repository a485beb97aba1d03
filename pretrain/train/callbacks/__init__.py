"""Side concerns of the training loop, each a callback with a declared priority (see `base`).

Producers (`ThroughputMonitor`, `Evaluator`, `ReplicaChecker`) make records and hand them to
`trainer.log`; sinks (`ConsoleProgress`, `JsonlWriter`, `TensorBoardWriter`) receive every record
in `on_log`. Sinks are installed on rank 0 only; the others run on every rank because they use
collectives. `SavePolicy` decides when to save, `NonFiniteGuard` what a non-finite step does.
"""

from pretrain.train.callbacks.base import Callback, TrainerView, ordered
from pretrain.train.callbacks.metrics import Evaluator, ThroughputMonitor
from pretrain.train.callbacks.replicas import ReplicaChecker
from pretrain.train.callbacks.saving import SavePolicy
from pretrain.train.callbacks.sinks import (
    ConsoleProgress,
    JsonlWriter,
    Plotter,
    TensorBoardWriter,
    format_duration,
)

__all__ = [
    "Callback",
    "ConsoleProgress",
    "Evaluator",
    "JsonlWriter",
    "Plotter",
    "ReplicaChecker",
    "SavePolicy",
    "TensorBoardWriter",
    "ThroughputMonitor",
    "TrainerView",
    "format_duration",
    "ordered",
]
