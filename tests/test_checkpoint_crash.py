"""A few trials of tests/crash_saves.py (SIGKILL of one rank at random moments while it saves after
every step; restart; repeat): every restart resumes from the newest complete checkpoint and no
complete checkpoint is ever lost. `python tests/crash_saves.py --trials 20` runs the full series."""

import pytest

from crash_saves import run_trials

pytestmark = pytest.mark.slow


def test_killing_a_rank_while_it_saves_never_loses_a_complete_checkpoint(tmp_path):
    report = run_trials(trials=2, seed=7, run_dir=tmp_path / "run")
    assert report["failures"] == []
    assert report["resumes_checked"] >= 1  # the second trial resumed, and was checked
    assert report["saves_committed"] > 0
