"""launch/: environment resolution (constructed environments are the input), host lists, the
DeepSpeed hostfile, the pre-flight check on real process groups, and the rendezvous deadline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from launch import LaunchError, compress, expand, expand_counts, resolve, slurm_port
from launch.env import batch_shell_warning
from launch.hostfile import hostfile_lines
from launch.rendezvous import check_address, ranges
from pretrain.testing import run_distributed
from slurm.cluster import json_objects
from training_runs import SMALL, start_ranks, tensorboard_steps

# What srun gives task 3 of `srun --nodes=2 --ntasks-per-node=2` in job 4242 (values seen on our cluster).
SRUN_TASK3 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "4",
    "SLURMD_NODENAME": "gpu08",
}


def test_srun_task_gets_rank_local_rank_world_and_rendezvous_from_slurm():
    info = resolve(SRUN_TASK3)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.node_rank, info.num_nodes, info.node, info.source) == (1, 2, "gpu08", "slurm")
    assert info.master_addr == "gpu07"  # the first host of the step
    assert info.master_port == 20000 + 4242 == slurm_port("4242")
    assert info.torch_env() == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "24242",
    }  # fmt: skip
    assert "rank 3/4 (local 1/2) on gpu08, node 2/2, started by srun (SLURM job 4242.0)" in info.describe()


def test_uneven_tasks_per_node_and_user_rendezvous_overrides():
    env = {
        **SRUN_TASK3,
        "SLURM_PROCID": "4",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_NODELIST": "gpu[07-08],cpu1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "31000",
    }
    info = resolve(env)
    assert (info.rank, info.world_size, info.local_world_size, info.num_nodes) == (4, 5, 1, 3)
    assert (info.master_addr, info.master_port) == ("10.0.0.7", 31000)


def test_ports_differ_between_jobs_and_concurrent_steps_and_avoid_the_ephemeral_range():
    ports = {slurm_port(str(job), str(step)) for job in range(1000, 1100) for step in range(3)}
    assert len(ports) == 300 and all(20000 <= p < 30000 for p in ports)
    assert slurm_port("4242_7") == slurm_port("4242")  # array task ids: the job number counts


def test_batch_shell_is_a_world_of_one_with_a_warning_when_the_job_has_more_tasks():
    env = {k: v for k, v in SRUN_TASK3.items() if not k.startswith("SLURM_STEP")}
    env["SLURM_PROCID"] = "0"
    info = resolve(env)
    assert (info.world_size, info.source) == (1, "single")
    assert "srun python pretrain/main.py" in (batch_shell_warning(env) or "")
    assert batch_shell_warning(SRUN_TASK3) is None


def test_rank_exported_in_a_batch_script_contradicts_srun_and_is_an_error_with_the_fix():
    env = {**SRUN_TASK3, "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError) as e:
        resolve(env)
    message = str(e.value)
    assert "this is task 3 of the 4 tasks srun started" in message and "Unset RANK, WORLD_SIZE" in message


def test_world_size_disagreeing_with_the_allocation_names_both():
    with pytest.raises(
        LaunchError, match=r"WORLD_SIZE=8 is set .* a world of 4; unset WORLD_SIZE, or start 8"
    ):
        resolve({**SRUN_TASK3, "WORLD_SIZE": "8"})
    with pytest.raises(LaunchError, match="WORLD_SIZE is set but RANK is not"):
        resolve({"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="MASTER_PORT=70000 is not a TCP port"):
        resolve({**SRUN_TASK3, "MASTER_PORT": "70000"})
    with pytest.raises(LaunchError, match="RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not"):
        resolve({"RANK": "0"})


def test_torchrun_inside_srun_is_trusted_and_recognised():
    env = {
        **SRUN_TASK3,
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_RANK": "13",
        "TORCHELASTIC_RUN_ID": "4242",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "29400",
    }
    info = resolve(env)
    assert (info.source, info.rank, info.world_size, info.local_rank, info.node_rank) == (
        "torchrun",
        13,
        16,
        5,
        1,
    )


def test_deepspeed_launcher_variables():
    env = {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29500",
        "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2",
    }  # fmt: skip
    info = resolve(env)
    assert (info.source, info.local_world_size, info.node_rank, info.num_nodes) == ("deepspeed", 2, 1, 2)


def test_open_mpi_and_mpich_variables_without_mpi4py():
    ompi = {
        "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "1234",
    }  # fmt: skip
    info = resolve(ompi, use_mpi4py=False)
    assert (info.source, info.rank, info.world_size, info.local_rank, info.node_rank) == (
        "openmpi",
        5,
        8,
        1,
        1,
    )
    assert (info.master_addr, info.master_port, info.num_nodes) == ("head", 1234, 2)
    # MPICH on one host, no MASTER_ADDR: loopback, torch's default port.
    mpich = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    info = resolve(mpich, use_mpi4py=False)
    assert (info.source, info.rank, info.master_addr, info.master_port) == ("mpich", 1, "127.0.0.1", 29500)
    # Hydra under SLURM: its proxies are srun tasks; the MPI variables describe the ranks.
    hydra = {
        **SRUN_TASK3,
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }
    hydra.update(PMI_RANK="6", PMI_SIZE="8", MPI_LOCALRANKID="2", MPI_LOCALNRANKS="4", MASTER_ADDR="gpu07")
    assert (resolve(hydra, use_mpi4py=False).rank, resolve(hydra, use_mpi4py=False).world_size) == (6, 8)
    with pytest.raises(LaunchError, match="across several hosts without MASTER_ADDR"):
        resolve({**mpich, "MPI_LOCALNRANKS": "1"}, use_mpi4py=False)


def test_nothing_set_is_a_single_process_on_loopback():
    info = resolve({})
    assert (info.rank, info.world_size, info.master_addr, info.source) == (0, 1, "127.0.0.1", "single")


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[001-003,010],login1", ["gpu001", "gpu002", "gpu003", "gpu010", "login1"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[09-11]", ["n09", "n10", "n11"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
    ],
)
def test_hostlist_expansion(hostlist, hosts):
    assert expand(hostlist) == hosts
    if shutil.which("scontrol"):  # the reference: SLURM's own parser
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split() == hosts


def test_hostlist_compression_counts_and_errors():
    assert compress(["gpu001", "gpu002", "gpu003", "gpu010", "login1"]) == "gpu[001-003,010],login1"
    assert expand(compress([f"n{i}" for i in range(1, 40)])) == [f"n{i}" for i in range(1, 40)]
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    for bad in ("n[1-2", "n[3-1]", "n[a-b]"):
        with pytest.raises(ValueError):
            expand(bad)
    with pytest.raises(LaunchError, match="cannot read the SLURM allocation"):
        resolve({**SRUN_TASK3, "SLURM_STEP_NODELIST": "gpu[07-"})


def test_hostfile_from_the_allocation():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "1(x2)"}
    assert hostfile_lines(env) == ["gpu07 slots=8", "gpu08 slots=8"]
    assert hostfile_lines({**env, "SLURM_GPUS_ON_NODE": ""}) == ["gpu07 slots=1", "gpu08 slots=1"]
    assert hostfile_lines({}, nodelist="a[1-2]", slots=4) == ["a1 slots=4", "a2 slots=4"]
    with pytest.raises(LaunchError, match="pass --nodelist"):
        hostfile_lines({})


def test_unresolvable_master_addr_is_named():
    info = resolve({**SRUN_TASK3, "MASTER_ADDR": "no-such-host.invalid"})
    with pytest.raises(LaunchError, match=r"MASTER_ADDR 'no-such-host\.invalid' does not resolve on gpu08"):
        check_address(info)


def test_rank_ranges():
    assert ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"


def test_launch_command_line(tmp_path):
    def run(*args, env=None):
        return subprocess.run(
            [sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True, text=True,
            env={"PATH": os.environ["PATH"], **(env or {})},
        )  # fmt: skip

    out = run("env", "--json", env=SRUN_TASK3)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["master_addr"] == "gpu07"
    assert "export RANK=3" in run("env", "--export", env=SRUN_TASK3).stdout
    out = run(
        "hostfile",
        "--output",
        str(tmp_path / "hosts"),
        env={"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "4"},
    )
    assert out.returncode == 0 and (tmp_path / "hosts").read_text() == "n1 slots=4\nn2 slots=4\n"
    assert run("hostnames", "x[1-2]").stdout.split() == ["x1", "x2"]
    assert run("run-dir", str(TINY), "run.dir=/some/where").stdout.strip() == "/some/where"
    bad = run("run-dir", str(TINY), "optim.lrr=1")
    assert bad.returncode == 2 and "did you mean 'optim.lr'" in bad.stderr
    bad = run("env", env={**SRUN_TASK3, "WORLD_SIZE": "8"})
    assert bad.returncode == 1 and bad.stderr.startswith("error: WORLD_SIZE=8")


# ----- on real process groups -----


def preflight_with_config_on_rank(odd_rank: int) -> str:
    from launch import current
    from launch.preflight import preflight

    info, _ = current()  # type: ignore[misc]
    text = "seed: 2\n" if info.rank == odd_rank else "seed: 1\n"
    try:
        return "ok: " + str(len(preflight(info, text)))
    except LaunchError as e:
        return str(e)


def test_preflight_names_the_rank_whose_config_differs(capfd):
    # (Ranks that agree pass it in every training run of the suite, e.g. tests/test_slurm.py.)
    messages = run_distributed(preflight_with_config_on_rank, 2, 1)
    assert messages[0] == messages[1]
    assert "pre-flight check failed" in messages[0]
    assert "config hash:" in messages[0] and "on rank 0 (" in messages[0] and "on rank 1 (" in messages[0]


def _main(env: dict[str, str], *overrides: str, run_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "pretrain/main.py", "--config", str(TINY), *SMALL, f"run.dir={run_dir}", *overrides],
        cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_rank_that_never_joins_is_named_and_every_rank_exits_with_code_7(tmp_path):
    from pretrain.parallel.distributed import free_port

    port = str(free_port())
    common = {"WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu"}
    procs = [
        _main(
            {**common, "RANK": str(r), "LOCAL_RANK": str(r)},
            "watchdog.join_timeout=5",
            "train.global_batch_size=12",
            run_dir=tmp_path,
        )
        for r in (0, 1)
    ]
    # A lone rank 1 of another world, whose rank 0 never starts.
    lonely = _main(
        {**common, "MASTER_PORT": str(free_port()), "RANK": "1", "LOCAL_RANK": "0"},
        "watchdog.join_timeout=3", "train.global_batch_size=12", run_dir=tmp_path / "lonely",
    )  # fmt: skip
    outs = [p.communicate(timeout=180) for p in procs]
    lonely_out = lonely.communicate(timeout=180)
    assert [p.returncode for p in procs] == [7, 7], outs
    assert "1 of 3 ranks did not join the rendezvous at 127.0.0.1:" in outs[0][1]
    assert "missing ranks 2" in outs[0][1] and "joined: ranks 0-1 on" in outs[0][1]
    assert "rank 1 on" in outs[1][1] and "rank 0 stopped the rendezvous" in outs[1][1]
    assert lonely.returncode == 7
    assert "could not reach rank 0's rendezvous at 127.0.0.1:" in lonely_out[1], lonely_out[1]


@pytest.mark.slow
def test_watchdog_dumps_every_rank_and_names_the_rank_that_sleeps(tmp_path):
    """Rank 1 sleeps at the end of step 2 (in a callback before the metrics); rank 0 goes on into
    the metrics' loss all-reduce of step 2 and waits there. After watchdog.step_timeout both exit
    with code 6, every rank's stack is in run.dir/hang/<time>/, and report.txt names rank 1."""
    procs = start_ranks([
        sys.executable, "tests/slurm/hang_train.py", "--sleep-rank", "1", "--sleep-after-step", "2",
        "--config", str(TINY), *SMALL, "train.steps=20", "watchdog.step_timeout=8", f"run.dir={tmp_path}",
        "logging.tensorboard=true",
    ])  # fmt: skip
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [6, 6], outs
    (incident,) = (tmp_path / "hang").iterdir()
    report = (incident / "report.txt").read_text()
    assert "behind: rank 1 (not inside a collective while the others wait in one)" in report, report
    assert (
        "rank 0 on" in report and "last completed step 1, waiting in torch.distributed.all_reduce" in report
    )
    rank1 = (incident / "rank-00001.txt").read_text()
    assert "last completed step 1" in rank1 and "not in a collective: at tests/slurm/hang_train.py" in rank1
    assert "time.sleep(3600)" in rank1
    rank0 = (incident / "rank-00000.txt").read_text()
    assert "waiting in torch.distributed.all_reduce" in rank0 and 'Thread "MainThread"' in rank0
    stderr = outs[0][1] + outs[1][1]
    assert "error: hang: no training step completed" in stderr
    assert not (tmp_path / "run.lock").exists()  # released although the watchdog leaves by os._exit
    assert tensorboard_steps(tmp_path, "loss") == [1]  # on disk, although os._exit skips every handler


def test_behind_ranks_from_reports():
    from pretrain.train.watchdog import behind_ranks

    def rep(step, collective=None):
        return {"step": step, "collective": collective}

    ar = "torch.distributed.all_reduce"
    assert behind_ranks({0: rep(5, ar), 1: rep(4), 2: rep(5, ar)}) == (
        [1],
        "their last completed step is older than step 5 of the others",
    )
    assert behind_ranks({0: rep(5, ar), 1: rep(5), 2: rep(5, ar)})[0] == [1]
    assert behind_ranks({0: rep(5, ar), 1: rep(5, "torch.distributed.broadcast")}) == (
        [],
        "every rank is inside a collective, but not the same one: torch.distributed.all_reduce, "
        "torch.distributed.broadcast",
    )
    assert behind_ranks({0: rep(5, ar), 1: rep(5, ar)}) == ([], f"every rank waits in {ar} at the same step")


def test_mpiexec_ranks_share_rank_0s_address_and_a_free_port_through_mpi4py():
    """`mpiexec -n 2` (MPICH from PyPI) without MASTER_ADDR/MASTER_PORT: mpi4py gives the local
    ranks and broadcasts rank 0's host and a port it found free."""
    pytest.importorskip("mpi4py")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_", "RANK", "WORLD_SIZE"))
    }
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", "2", sys.executable, "-m", "launch", "env",
         "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    infos = sorted(json_objects(out.stdout), key=lambda i: i["rank"])
    assert [(i["rank"], i["world_size"], i["local_rank"], i["local_world_size"]) for i in infos] == [
        (0, 2, 0, 2),
        (1, 2, 1, 2),
    ]
    assert {i["source"] for i in infos} == {"mpich"}
    assert (
        infos[0]["master_addr"] == infos[1]["master_addr"]
        and infos[0]["master_port"] == infos[1]["master_port"]
    )
    assert infos[0]["master_port"] != 29500 and (infos[0]["node_rank"], infos[0]["num_nodes"]) == (0, 1)


WATCHDOG_THEN_ERROR = """
import sys, time, types
from pathlib import Path
from torch.distributed import TCPStore
from pretrain.train.watchdog import Watchdog

def training(run_dir):
    # World of 2 whose rank 1 never reports: the alarm's report waits its grace (10 s) for it.
    store = TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    dog = Watchdog(run_dir, 0, 2, "n", step_timeout=0.5, first_step_timeout=0.5, store=store)
    dog.on_train_start(types.SimpleNamespace(state=types.SimpleNamespace(step=0)))
    dog._fit_code = training.__code__  # this function plays Trainer.fit
    while not store.check(["watchdog/report/0"]):  # the alarm is being handled
        time.sleep(0.05)
    raise RuntimeError("Connection closed by peer")  # as a collective fails once a peer has exited

training(Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_training_thread_that_fails_during_the_hang_dump_still_exits_with_the_hang_code(tmp_path):
    """The first rank to exit after a hang makes its peers' collectives fail; they must still exit 6."""
    from pretrain.train.watchdog import EXIT_HANG

    proc = subprocess.run(
        [sys.executable, "-c", WATCHDOG_THEN_ERROR, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "RuntimeError: Connection closed by peer" in proc.stderr
    assert proc.returncode == EXIT_HANG, proc.stderr
    (incident,) = (tmp_path / "hang").iterdir()
    assert "last completed step 0" in (incident / "rank-00000.txt").read_text()
    assert "no answer from rank 1" in (incident / "report.txt").read_text()


def test_watchdog_settings_are_checked_and_the_exit_codes_agree():
    from pretrain import main
    from pretrain.config import ConfigError, load_config
    from pretrain.train.watchdog import EXIT_HANG

    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["watchdog.step_timeout=-1", "watchdog.join_timeout=0"])
    assert "watchdog.step_timeout must be >= 0 seconds (0 disables it), got -1.0" in str(e.value)
    assert "watchdog.join_timeout must be positive, got 0.0" in str(e.value)
    assert main.EXIT_HANG == EXIT_HANG == 6 and main.EXIT_LAUNCH_ERROR == 7


def test_preflight_counts_gpus_bound_per_task_and_refuses_ranks_sharing_one():
    """With `srun --gpus-per-task=1` every rank sees one GPU (device_count 1): the node's GPUs are the
    distinct ones its ranks use. Two ranks on one GPU is the misconfiguration, named with the fix."""
    from launch.preflight import MUST_AGREE, problems

    def rank(r, node, seen, uuid):
        same = dict.fromkeys(MUST_AGREE, "x")
        return {**same, "rank": r, "node": node, "device": "cuda", "device_count": seen, "device_uuid": uuid}

    per_task = [rank(r, f"n{r // 2}", 1, f"gpu-{r}") for r in range(4)]
    node_wide = [rank(r, f"n{r // 2}", 2, f"gpu-{r}") for r in range(4)]
    assert problems(per_task) == [] and problems(node_wide) == []
    shared = [
        rank(0, "n0", 1, "gpu-0"),
        rank(1, "n0", 1, "gpu-0"),
        rank(2, "n1", 1, "g2"),
        rank(3, "n1", 1, "g3"),
    ]
    (first, second) = problems(shared)
    assert first == "GPUs per node: 1 on n0; 2 on n1 (every node must have the same number)"
    assert second.startswith("node n0: ranks 0-1 share one GPU (2 ranks, 1 GPUs): start one task per GPU")
