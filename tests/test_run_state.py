"""The state protocol: a checkpoint is a dict of named Stateful parts, saved and restored in one
place, callback state included; callbacks run in the order of their declared priority."""

import json

import pytest

from pretrain.checkpoint.state import RunState, read_state_document
from pretrain.testing import run_distributed
from pretrain.train.callbacks.base import Callback, ordered
from training_runs import train_with_poisoned_batches

BATCH = 8  # train.global_batch_size of training_runs.SMALL


class Counter:
    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class Seeded(Counter):
    def start_fresh(self, step):
        self.value = -step


def test_parts_restore_in_order_and_history_survives_a_rollback():
    state = RunState()
    loop, history, rng = Counter(5), Counter(2), Seeded(7)
    state.register("loop", loop)
    state.register("callback.history", history, rolled_back=False, required=False)
    state.register("rng", rng, per_rank=True)
    shared, ranks = state.shared_state(), state.rank_state()
    assert shared == {"loop": {"value": 5}, "callback.history": {"value": 2}} and ranks == {
        "rng": {"value": 7}
    }

    loop.value, history.value, rng.value = 9, 3, 8
    state.load(shared, ranks, step=4, rollback=True)
    assert (loop.value, history.value, rng.value) == (5, 3, 7)  # the history kept its newer count
    state.load(shared, {}, step=4)  # a requeue into another layout: no file of this rank
    assert (loop.value, history.value, rng.value) == (5, 2, -4)
    state.load({"loop": {"value": 1}}, ranks, step=4)  # an older checkpoint without the callback's part
    assert (loop.value, history.value) == (1, 2)
    with pytest.raises(Exception, match="has no loop"):
        state.load({}, ranks, step=4)
    with pytest.raises(TypeError, match="start_fresh"):
        state.register("other", Counter(), per_rank=True)


def test_callbacks_run_by_priority_whatever_the_order_they_were_added_in():
    class Named(Callback):
        def __init__(self, name, priority):
            self.name, self.priority = name, priority  # type: ignore[misc]

    callbacks = [
        Named("watch", -100),
        Named("sink", -50),
        Named("probe", 0),
        Named("guard", 100),
        Named("b", 0),
    ]
    assert [c.name for c in ordered(callbacks)] == ["guard", "probe", "b", "sink", "watch"]


@pytest.mark.slow
def test_the_non_finite_event_count_is_per_run_across_a_requeue(tmp_path):
    """max_nonfinite_events=2 with the skip policy. The first process meets one bad batch and saves
    at its end; the requeued one meets two more: the third event of the run stops it, although that
    process itself saw only two (a count kept per process would let it go on)."""
    run_dir = str(tmp_path / "run")
    policy = ["train.on_nonfinite=skip", "train.max_nonfinite_events=2", "checkpoint.save_final=true"]
    first = run_distributed(train_with_poisoned_batches, 1, [*policy, "train.steps=3"], run_dir, [1 * BATCH])[
        0
    ]
    assert first["error"] is None
    assert [r["step"] for r in first["records"] if r.get("event")] == [2]
    state = json.loads((tmp_path / "run/checkpoints/step00000003/state.json").read_text())
    assert state["parts"]["callback.nonfinite_guard"] == {"events": 1}

    second = run_distributed(
        train_with_poisoned_batches, 1, [*policy, "train.steps=8"], run_dir, [4 * BATCH, 5 * BATCH]
    )[0]
    assert second["error"] is not None and second["error"]["step"] == 6
    assert "3 non-finite steps, more than train.max_nonfinite_events" in second["error"]["message"]


def test_a_version_1_state_file_is_read_as_the_current_format(tmp_path):
    """Checkpoints written before the state protocol resume: their fields map onto the named parts."""
    v1 = {
        "format": "pretrain-state-v1",
        "step": 4,
        "trainer": {"step": 4, "tokens_seen": 4096, "data": {"consumed_samples": 64, "skipped_batches": [8]},
                    "skipped_steps": [2]},
        "lr_scheduler": {"last_epoch": 3, "_step_count": 4, "base_lrs": [0.001, 0.001]},
        "engine": {"global_steps": 4, "global_samples": 64, "skipped_steps": 1},
        "adam_step": 3,
        "layout": {"dp": 2},
        "world_size": 2,
        "provenance": {},
        "saved_at": 1.0,
    }  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps(v1))
    document = read_state_document(tmp_path)
    assert document["parts"] == {
        "engine": {"global_steps": 4, "global_samples": 64, "skipped_steps": 1, "adam_step": 3},
        "lr_schedule": {"position": 3},
        "loop": {"step": 4, "tokens_seen": 4096, "skipped_steps": [2]},
        "data": {"consumed_samples": 64, "skipped_batches": [8]},
    }
    assert document["layout"] == {"dp": 2} and document["step"] == 4
