"""The construction proof: every rank's layers and shards built on the meta device by the trainer's
own code, checked against the plain model and the planner's per-rank counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.plan import construct
from pretrain.plan.construct import prove_construction
from pretrain.plan.counts import parameter_count

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_1t_preset_builds_on_every_stage_and_tensor_parallel_rank():
    cfg = load_config(REPO / "configs" / "1t.yaml", world_size=384 * 8)
    proof = prove_construction(cfg)  # 64 stages x 8 shards, 1,049 layers
    assert proof.ok, proof.problems
    assert proof.ranks == 64 * 8
    # Over one data-parallel replica the shards add up to the model: every parameter once, the norms
    # (2 per block + the final one, 25,600 each) on all 8 tensor-parallel ranks, and the tied output
    # layer a second copy of the embedding (51,200 x 25,600) on the last stage. No vocabulary padding:
    # 51,200 is a multiple of 128 x 8.
    norms = (2 * 128 + 1) * 25_600
    assert proof.total == parameter_count(cfg) + 7 * norms + 51_200 * 25_600


@pytest.mark.parametrize(
    ("world", "overrides"),
    [
        (4, ["parallel.tp=2", "parallel.pp=2"]),
        (2, ["parallel.tp=2", "model.tie_embeddings=true"]),  # one stage: the head is the embedding
        (
            4,
            [
                "parallel.tp=2",
                "parallel.pp=2",
                "model.tie_embeddings=true",
                "parallel.sequence_parallel=true",
            ],
        ),
        (6, ["parallel.pp=3", "parallel.pipeline_partition=parameters", "model.num_layers=5"]),
        (4, ["parallel.tp=4", "model.num_heads=4", "model.num_kv_heads=4", "model.vocab_size=321"]),
    ],
)
def test_small_layouts_build(world, overrides):
    cfg = load_config(TINY, [*overrides, "train.global_batch_size=24"], world_size=world)
    proof = prove_construction(cfg)
    assert proof.ok, proof.problems
    assert proof.ranks == cfg.parallel.tp * cfg.parallel.pp


def test_proof_fails_when_the_planner_miscounts(monkeypatch):
    cfg = load_config(TINY, ["parallel.tp=2", "parallel.pp=2"], world_size=4)
    monkeypatch.setattr(construct, "rank_parameters", lambda c: [1, 1])
    problems = prove_construction(cfg).problems
    assert len(problems) == 4 and "planner counts 1" in problems[0]


def test_proof_fails_when_shards_do_not_make_the_plain_model(monkeypatch):
    # Claim that the norms are split by tensor parallelism: their (replicated) shards then do not
    # concatenate to the plain shape, and the proof must say so.
    cfg = load_config(TINY, ["parallel.tp=2"], world_size=2)
    real = construct.partition_dim
    monkeypatch.setattr(construct, "partition_dim", lambda name: 0 if "norm" in name else real(name))
    problems = prove_construction(cfg).problems
    assert problems and all("norm" in p and "do not make" in p for p in problems)
