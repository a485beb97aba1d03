#!/usr/bin/env bash
# A real SLURM cluster of two emulated nodes on this machine, for the tests and for trying the
# scripts in slurm/ by hand:
#
#   sudo tests/slurm/cluster.sh start      # install (Debian/Ubuntu apt) and start; idempotent
#   eval "$(tests/slurm/cluster.sh env)"   # SLURM_CONF=... for sbatch, srun, squeue, scontrol
#   tests/slurm/cluster.sh status
#   sudo tests/slurm/cluster.sh stop       # cancel its jobs, stop its daemons (by their pid files)
#
# Nodes n1 and n2 are two slurmd processes (`slurmd -N n1|n2`) on the loopback aliases 127.0.0.2
# and 127.0.0.3 (named in /etc/hosts), each advertising 16 CPUs whatever the machine has, so test
# jobs run side by side, and 2 GPUs that are not there (gres gpu:2 on /dev/tty0 and /dev/tty1, which
# nothing opens): enough for SLURM to bind GPUs to tasks and set CUDA_VISIBLE_DEVICES, for tests of
# the scripts' GPU options; nothing may use CUDA. Everything lives under $PRETRAIN_TEST_SLURM_DIR (default
# /var/lib/pretrain-test-slurm) with its own slurm.conf and ports, so an existing SLURM
# installation's /etc/slurm is never read or changed. Needs root; a running cluster is reused.
set -euo pipefail

ROOT=${PRETRAIN_TEST_SLURM_DIR:-/var/lib/pretrain-test-slurm}
CONF=$ROOT/slurm.conf
NODES=(n1 n2)
ADDRS=(127.0.0.2 127.0.0.3)
CTLD_PORT=16817
NODE_PORTS=(16818 16819)
CPUS_PER_NODE=16
GPUS_PER_NODE=2

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

our_daemon() {  # the pid in file $1 is alive and is one of this cluster's daemons
    # A pid file can outlive its daemon (a machine restored from an image, a reboot): its pid may
    # then be any process, pytest included, which must never be taken for the daemon or signalled.
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE "^/usr/sbin/slurm(ctld|d) -f $CONF( |\$)"
}

munge_works() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

cluster_up() {
    munge_works || return 1
    our_daemon "$ROOT/run/slurmctld.pid" || return 1
    for node in "${NODES[@]}"; do our_daemon "$ROOT/run/slurmd-$node.pid" || return 1; done
    grep -q "^GresTypes=gpu" "$CONF" || return 1  # a cluster started before the fake GPUs: restart it
    SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    # PMIx must be present before slurmd starts, or `srun --mpi=pmix` hangs.
    [[ -n $(ls /usr/lib/*/libpmix.so* 2>/dev/null) ]] || missing+=(libpmix-dev)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge libpmix-dev >/dev/null
}

add_hosts() {
    local i
    for i in "${!NODES[@]}"; do
        grep -qE "^${ADDRS[$i]}[[:space:]]+${NODES[$i]}([[:space:]]|\$)" /etc/hosts \
            || echo "${ADDRS[$i]} ${NODES[$i]}" >>/etc/hosts
    done
}

start_munge() {
    mkdir -p /run/munge && chown munge:munge /run/munge
    # A munged already serving the default socket (ours from an earlier start, or the system's) is used as is.
    munge_works && return 0
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (the munge package creates it)"
    runuser -u munge -- /usr/sbin/munged 9>&-
    local _
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    die "munged did not start"
}

write_conf() {
    local host memory i
    host=$(hostname -s)
    # Real memory of the machine (MiB, from slurmd -C) less 1 GiB, halved between the two nodes.
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    memory=$(((memory - 1024) / ${#NODES[@]}))
    mkdir -p "$ROOT"/{ctld,run,log} "${NODES[@]/#/$ROOT/spool-}"
    {
        cat <<CONF
# Written by tests/slurm/cluster.sh: a two-node test cluster on one machine.
ClusterName=pretrain-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job restarts after ~11 s instead of ~2 min.
AuthInfo=cred_expire=10
MpiDefault=none
GresTypes=gpu
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Let CPUs= exceed the real cores, so test jobs run side by side.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
StateSaveLocation=$ROOT/ctld
SlurmdSpoolDir=$ROOT/spool-%n
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
CONF
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeAddr=${ADDRS[$i]} NodeHostname=$host Port=${NODE_PORTS[$i]}" \
                "CPUs=$CPUS_PER_NODE RealMemory=$memory Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.new"
    # The fake GPUs: device files that exist on every Linux machine; SLURM only names them.
    echo "Name=gpu File=/dev/tty[0-$((GPUS_PER_NODE - 1))]" >"$ROOT/gres.conf"
    mv "$CONF.new" "$CONF"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "needs root (it installs packages and starts slurmctld, slurmd and munged)"
    mkdir -p "$ROOT"
    exec 9>"$ROOT.lock"
    flock -w 300 9 || die "another start holds $ROOT.lock for more than 300 s"  # one start at a time
    if cluster_up; then
        log "already running (SLURM_CONF=$CONF)"
    else
        install_packages
        add_hosts
        start_munge
        stop_daemons
        write_conf
        # 9>&-: the daemons must not inherit (and so hold forever) the lock.
        /usr/sbin/slurmctld -f "$CONF" 9>&-
        for node in "${NODES[@]}"; do /usr/sbin/slurmd -f "$CONF" -N "$node" 9>&-; done
    fi
    local _
    for _ in $(seq 120); do
        if [[ $(SLURM_CONF=$CONF sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)') -eq ${#NODES[@]} ]]; then
            log "up: nodes ${NODES[*]} (SLURM_CONF=$CONF)"
            return 0
        fi
        sleep 0.5
    done
    SLURM_CONF=$CONF sinfo -N >&2 || true
    die "the nodes did not become idle within 60 s; logs in $ROOT/log"
}

stop_daemons() {
    local pidfile pid _
    for pidfile in "$ROOT"/run/slurmd-*.pid "$ROOT/run/slurmctld.pid"; do
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if our_daemon "$pidfile"; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

stop() {
    [[ $(id -u) -eq 0 ]] || die "needs root"
    if cluster_up; then
        SLURM_CONF=$CONF scancel --full --quiet --partition=debug 2>/dev/null || true
        sleep 1
    fi
    stop_daemons
    log "stopped (munged is left running)"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) cluster_up && SLURM_CONF=$CONF sinfo -N || { echo "not running"; exit 1; } ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
