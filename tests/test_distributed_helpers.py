import pytest

from pretrain.testing import run_distributed
from training_runs import fail_on_rank

pytestmark = pytest.mark.slow


def test_a_failure_on_one_rank_stops_every_rank_without_a_hang():
    assert run_distributed(fail_on_rank, 3, 1, timeout=120) == [
        "peer failure",
        "own error: shard-00003.bin is missing",
        "peer failure",
    ]
    assert run_distributed(fail_on_rank, 2, -1, timeout=120) == ["ok", "ok"]
