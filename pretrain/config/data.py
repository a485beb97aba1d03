"""`data.*`: which prepared datasets are trained on, how they are blended, and the checks of both."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import documented


@dataclass
class DataConfig:
    """Where the training tokens come from."""

    paths: list[str] = documented(
        "Prepared datasets (folders written by `python -m pretrain.data prepare`, local or fsspec URLs). "
        "Empty: the built-in corpus, the Python standard library's own source read as bytes.",
        default_factory=list,
    )
    weights: list[float] | None = documented(
        "Blend weights, one per path (normalised); null weights each dataset by its token count.", None
    )
    validation_fraction: float = documented("Fraction of each dataset held out for validation loss.", 0.02)
    verify_checksums: bool = documented(
        "Check every shard's sha256 against its manifest before training (reads all data once).", False
    )
    cache_dir: str | None = documented(
        "Local cache for remote (fsspec URL) datasets; null: $PRETRAIN_CACHE or ~/.cache/pretrain.", None
    )

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                p.append(
                    f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}; give "
                    f"one weight per path, or data.weights=null to weight by token count"
                )
            if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
                p.append(f"data.weights must be >= 0 with a positive sum, got {self.weights}")
        if len(set(self.paths)) != len(self.paths):
            p.append(
                f"data.paths lists a dataset twice: {self.paths}; use data.weights to sample one more often"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            p.append(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        return p
