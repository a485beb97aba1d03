"""The local SLURM cluster for the tests: a session fixture that starts it (tests/slurm/cluster.sh)
and a small client for submitting jobs and waiting for them through the real commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLUSTER_SH = HERE / "cluster.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object in `text` (`python -m launch env --json` output of several ranks), also
    where two processes' lines ran together in a launcher's shared stdout."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        value, end = decoder.raw_decode(text, i)
        found.append(value)
        i = text.find("{", end)
    return found


class Cluster:
    def __init__(self, conf: str):
        self.env = {**os.environ, "SLURM_CONF": conf, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}

    def run(self, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=REPO, env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed:\n{out.stderr}")
        return out.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` of a job (one record per array task), as key=value dicts."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        records = []
        for line in out.stdout.splitlines():
            record: dict[str, str] = {}
            for field in line.split():
                key, _, value = field.partition("=")
                record.setdefault(key, value)
            records.append(record)
        return records

    def wait(self, job_id: str, timeout: float = 600, log: Path | None = None) -> list[dict[str, str]]:
        """Poll until every task of the job has ended (a requeued job is pending again, not ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in DONE for r in records):
                return records
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s: {self.jobs(job_id)}\n{tail}")


def start_cluster() -> Cluster:
    """Start (or reuse) the two-node cluster (n1, n2) on this machine; skips the calling test only
    where it cannot be started (not root, or no SLURM and no apt-get to install it)."""
    if os.geteuid() != 0:
        pytest.skip(
            "the local SLURM cluster needs root: tests/slurm/cluster.sh installs and starts munged, slurmctld, slurmd"
        )
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip(
            "SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu: slurm-wlm, munge)"
        )
    out = subprocess.run([str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"tests/slurm/cluster.sh start failed:\n{out.stdout}{out.stderr}")
    conf = subprocess.run([str(CLUSTER_SH), "env"], capture_output=True, text=True, check=True).stdout
    return Cluster(conf.strip().split("=", 1)[1])
