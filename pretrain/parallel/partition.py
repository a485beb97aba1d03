"""How the layer list (embedding, blocks..., final norm, head) is split into pipeline stages.

Pure arithmetic on the config (layer sizes come from the meta device), so the split is known, and
an impossible one refused, when the config is read: before any process group or model exists.
"""

from __future__ import annotations

import torch

from pretrain.config import Config, ConfigError
from pretrain.model.transformer import build_layer, num_layers


def partition_layers(cfg: Config) -> list[int]:
    """Stage boundaries over the layer list: stage s holds layers [parts[s], parts[s + 1]).

    'layers': decoder blocks split as evenly as possible (earlier stages take the remainder, since
    the last stage also computes the output layer and the loss); the embedding joins the first stage,
    the final norm and the output layer the last. 'parameters': contiguous stages whose largest
    parameter count is as small as possible (the padded embedding and output layer included), every
    stage holding at least one block.
    """
    pp, blocks, total = cfg.parallel.pp, cfg.model.num_layers, num_layers(cfg.model)
    if cfg.parallel.pipeline_partition == "layers":
        parts = [0]
        for stage in range(pp - 1):
            held = blocks // pp + (1 if stage < blocks % pp else 0)
            parts.append(parts[-1] + held + (1 if stage == 0 else 0))
        return [*parts, total]
    counts = layer_parameter_counts(cfg)
    parts = balanced_boundaries(counts, pp)
    for stage in range(pp):
        if not any(1 <= i <= blocks for i in range(parts[stage], parts[stage + 1])):
            raise ConfigError(
                [
                    f"parallel.pipeline_partition=parameters leaves pipeline stage {stage} without a decoder "
                    f"block (layer parameter counts {counts}); use parallel.pipeline_partition=layers or a "
                    f"smaller parallel.pp"
                ]
            )
    return parts


def layer_parameter_counts(cfg: Config) -> list[int]:
    """Parameters of every layer in the list, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        return [
            sum(p.numel() for p in build_layer(cfg.model, i, cfg.padded_vocab_size, cfg.seed).parameters())
            for i in range(num_layers(cfg.model))
        ]


def balanced_boundaries(weights: list[int], parts: int) -> list[int]:
    """Split `weights` into `parts` non-empty contiguous runs minimising the heaviest run (the linear
    partition problem, solved exactly by dynamic programming over prefix sums)."""
    n = len(weights)
    assert 1 <= parts <= n, (parts, n)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest possible heaviest run when the first i layers form k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]
