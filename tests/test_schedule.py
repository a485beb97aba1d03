import itertools
import math

import pytest
import torch

from pretrain.config import ScheduleConfig
from pretrain.optim.schedule import LRSchedule


def curve(kind, steps=100, warmup=10, min_ratio=0.1, decay_fraction=0.2):
    schedule = LRSchedule(ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=min_ratio,
                                         decay_fraction=decay_fraction), steps)  # fmt: skip
    return [schedule(step) for step in range(steps)]


def test_warmup_is_linear_and_reaches_peak():
    lrs = curve("cosine")
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[0] > 0  # the first step already learns


def test_cosine_decays_monotonically_to_the_minimum_at_the_last_step():
    lrs = curve("cosine")
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)
    middle = 10 + (99 - 10) / 2  # half-way through the decay the cosine is at the mean of peak and floor
    assert LRSchedule(ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1), 100)(middle) == pytest.approx(0.55)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    lrs = curve("wsd")
    assert lrs[10:80] == pytest.approx([1.0] * 70)
    assert lrs[-1] == pytest.approx(0.1)
    decay = lrs[79:]
    steps = [a - b for a, b in itertools.pairwise(decay)]
    assert steps == pytest.approx([0.9 / 20] * 20)


def test_constant_after_warmup():
    assert curve("constant")[10:] == pytest.approx([1.0] * 90)


def test_scheduler_state_round_trips_so_a_resumed_run_continues_the_curve():
    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(ScheduleConfig(warmup_steps=5), 50))

    opt, sched = make()
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert math.isclose(sched2.get_last_lr()[0], sched.get_last_lr()[0])


def test_a_warning_is_given_exactly_when_the_curve_loses_its_shape_in_train_steps():
    """A warmup as long as train.steps (a preset's steps shortened for a smoke test) is warned about, not
    refused; the warning must come exactly when the real curve never reaches the peak, never decays to
    the floor, or (wsd) drops before the warmup is over."""
    for kind, steps, warmup in itertools.product(("cosine", "wsd", "constant"), range(2, 30), range(0, 35)):
        lrs = curve(kind, steps, warmup)
        shaped = max(lrs) == pytest.approx(1.0)
        if kind != "constant":
            shaped = shaped and lrs[-1] == pytest.approx(0.1)
        decay_start = steps - max(1, round(0.2 * steps))
        if kind == "wsd" and decay_start >= 1:
            shaped = shaped and lrs[decay_start - 1] == pytest.approx(1.0)
        warnings = ScheduleConfig(kind=kind, warmup_steps=warmup).warnings(steps, 1e-3)
        assert bool(warnings) == (not shaped), (kind, steps, warmup, lrs, warnings)
    (message,) = ScheduleConfig(warmup_steps=100).warnings(20, 1e-3)
    assert message == (
        "schedule.warmup_steps (100) is longer than train.steps (20): the learning rate never reaches optim.lr "
        "(0.001), it stops at 0.0002 (20% of it) and the cosine decay never starts; set schedule.warmup_steps <= 18"
    )


def test_dry_run_warns_about_a_warmup_longer_than_the_run():
    import subprocess
    import sys

    from conftest import REPO, TINY

    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "main.py"), "--config", str(TINY), "--dry-run", "train.steps=5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: schedule.warmup_steps (10) is longer than train.steps (5)" in result.stderr
