"""Remote datasets read through a real S3 server (moto, as a process, with s3fs and the endpoint in
FSSPEC_S3_ENDPOINT_URL), and a two-rank training run over http:// that trains as on the local copy."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import DataConfig
from pretrain.parallel.distributed import free_port
from test_data_remote import RangeServer, config, read_samples, write_dataset

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_endpoint(monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.2)
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def upload(folder: Path, endpoint: str, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir(bucket)
    for path in folder.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/d/{path.relative_to(folder).as_posix()}")


def test_a_dataset_on_s3_reads_back_the_local_tokens(s3_endpoint, tmp_path, monkeypatch):
    write_dataset(tmp_path / "d", tokens=20_000)
    upload(tmp_path / "d", s3_endpoint, "corpus")
    # The reader gets the endpoint as users give it: fsspec's FSSPEC_S3_<option> variables, read
    # when fsspec is imported (in the fresh process).
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_endpoint)
    url = "s3://corpus/d"
    with mp.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(read_samples, (url, config(url, tmp_path / "cache")))
    assert remote == read_samples(str(tmp_path / "d"), DataConfig())
    assert len(list((tmp_path / "cache" / "chunks").glob("*.0*"))) >= 2  # read in chunks


@pytest.mark.slow
def test_two_ranks_train_over_http_with_the_losses_of_the_local_copy(tmp_path):
    from pretrain.testing import run_distributed
    from training_runs import step_records, train_and_read_metrics

    write_dataset(tmp_path / "d")
    # The same blocks for both copies: auto (null) gives remote data blocks and local data a global
    # shuffle; the order depends on the configuration and the data, not on where the data lies.
    common = ["model.vocab_size=300", "train.steps=4", "data.shuffle_block=32", "data.shuffle_window=4"]
    local, _ = run_distributed(
        train_and_read_metrics, 2, [*common, f"data.paths=[{tmp_path / 'd'}]"], str(tmp_path / "a")
    )
    with RangeServer(tmp_path) as server:
        remote_data = [
            f"data.paths=[{server.url}/d]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.cache_chunk=1KiB",
        ]
        remote, _ = run_distributed(train_and_read_metrics, 2, [*common, *remote_data], str(tmp_path / "b"))
        served = server.bytes_served(".bin")
    losses = [r["loss"] for r in step_records(local)]
    assert len(losses) == 4 and [r["loss"] for r in step_records(remote)] == losses
    # 5 steps read (4 trained, 1 prefetched) of 8 samples of 65 tokens, each in at most 2 chunks of
    # 1 KiB: measured 44,032 of 400,000 bytes (43 chunks)
    assert 5 * 8 * 65 * 2 <= served <= 5 * 8 * 2 * 1024


@pytest.mark.slow
def test_a_resume_over_http_keeps_the_blocks_it_started_with(tmp_path):
    """Auto blocks (4 chunks) of a remote dataset, saved at step 3 and resumed with twice the chunk
    (so auto would mean blocks twice as long): steps 4-6 are the uninterrupted run's, bitwise, and
    the checkpoint's loader state records the blocks. The other blocks do change the samples: a fresh
    run with the new chunk trains on other ones."""
    from pretrain.testing import run_distributed
    from training_runs import step_records, train_and_read_metrics

    write_dataset(tmp_path / "d")
    save = ["model.vocab_size=300", "train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0"]
    save += ["train.eval_interval=0"]
    with RangeServer(tmp_path) as server:
        remote = [f"data.paths=[{server.url}/d]", f"data.cache_dir={tmp_path / 'cache'}"]

        def run(run_dir: str, *extra: str) -> dict[int, float]:
            (records,) = run_distributed(train_and_read_metrics, 1, [*save, *remote, *extra], run_dir)
            return {r["step"]: r["loss"] for r in step_records(records)}

        whole = run(str(tmp_path / "a"), "data.cache_chunk=1KiB")
        checkpoint = tmp_path / "a" / "checkpoints" / "step00000003"
        resumed = run(str(tmp_path / "b"), "data.cache_chunk=2KiB", f"checkpoint.resume={checkpoint}")
        other = run(str(tmp_path / "c"), "data.cache_chunk=2KiB")
    assert [resumed[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]
    assert [other[s] for s in (1, 2, 3)] != [whole[s] for s in (1, 2, 3)]
    data_state = json.loads((checkpoint / "state.json").read_text())["parts"]["data"]
    assert data_state["order_version"] == 3 and data_state["shuffle_blocks"] == [
        [32, 64]
    ]  # 4 KiB of 128-byte samples
