"""`universal_checkpoint_info`: what DeepSpeed's universal-checkpoint tools (`ds_to_universal`) need
to know about our parameters to merge tensor-parallel shards and strip vocabulary padding.

Patterns are anchored regular expressions over the engine's parameter names (plain names, or the
pipeline's layer-index names), derived from the same TP plan the trainer applies.
"""

from __future__ import annotations

import re
from typing import Any

from pretrain import deepspeed_compat as compat
from pretrain.config import Config
from pretrain.model.names import VOCAB_PARAMETERS
from pretrain.parallel.pipeline import engine_parameter_names
from pretrain.parallel.tp_plan import partition_dim


def universal_checkpoint_info(cfg: Config, pipelined: bool) -> dict[str, Any]:
    c = compat.universal_checkpoint_keys()

    names = engine_parameter_names(cfg, pipelined)

    def patterns(names_: list[str]) -> list[str]:
        return [f"^{re.escape(n)}$" for n in names_]

    replicated = [engine for plain, engine in names.items() if partition_dim(plain) is None]
    row_parallel = [engine for plain, engine in names.items() if partition_dim(plain) == 1]
    vocabulary = [engine for plain, engine in names.items() if plain in VOCAB_PARAMETERS]
    tied = [names["embedding.weight"]] if cfg.model.tie_embeddings and pipelined else []
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.ORIGINAL_VOCAB_SIZE: cfg.model.vocab_size,
        c.PADDED_VOCAB_SIZE: cfg.padded_vocab_size,
        c.TP_REPLICATED_PARAMETER_PATTERNS: patterns(replicated),
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: patterns(row_parallel),
        c.VOCABULARY_PARAMETER_PATTERNS: patterns(vocabulary),
        c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: patterns(tied),
    }
