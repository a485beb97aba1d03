# Sourced by train.sbatch: what an ended training step means (requeue or stop), and which node to
# leave out of the restart. Needs only bash, grep, sed and, for exclude_decision, SLURM's commands.
#
# srun prints one line per node and outcome of the step's tasks, e.g.
#   srun: error: n2: task 1: Killed
#   srun: error: n1: tasks 0-3: Exited with exit code 4
#   srun: error: n3: task 9: Aborted (core dumped)
#   srun: error: Node failure on n4
# and exits with the highest exit code of the tasks, or 128+n if a task was killed by signal n. The
# lines are not in the order the tasks ended (of two tasks on one node, the rank that exited 1 on
# losing its peer was reported before the peer killed with SIGKILL), so no line's position tells
# the cause; what a line says does:
#   - a task that exited with a final code (2-7) decides: the job ends with that code, whatever
#     happened to the others (srun ends them 60 s after the first exit, --wait=60);
#   - else a node failure or a task killed by a signal requeues (the others' exit 8 is their lost
#     peer), unless the signal came from the OOM killer (final: the same settings run out again);
#   - else exit 8 on every task that says anything (each lost a peer, none failed on its own: the
#     network between them broke) requeues, where an exit 1 (a bug) beside them is final;
#   - tasks that srun itself ended (its lines after "First task exited 60s ago") say nothing.

# The lines of srun's (and slurmstepd's) own messages among a step's stderr.
SRUN_MESSAGE='^(srun|slurmstepd[^:]*): '

final_reason() {  # the meaning of a final exit code
    case $1 in
        1) echo "an unexpected error: a bug, or the environment failing in a way nobody checked for; the traceback is above" ;;
        2) echo "invalid configuration" ;;
        3) echo "the loss became non-finite" ;;
        4) echo "unusable data" ;;
        5) echo "a checkpoint could not be written" ;;
        6) echo "hang: stacks and report in ${RUN_DIR:-run.dir}/hang/" ;;
        7) echo "the launch failed (see the first error above)" ;;
        *) echo "see the errors above" ;;
    esac
}

# classify_exit RC MESSAGES [SIGNALLED]
#   RC: srun's exit code; MESSAGES: a file with srun's messages of the step; SIGNALLED: the signal
#   this script passed on to the tasks, if any.
# Sets VERDICT (finished, requeue or final), CODE (the exit code the job ends with when it is not
# requeued), WHY (what happened, for the log), WHERE (srun's first failure line, shortened, or
# empty) and FAILED_NODE (the node to leave out of a restart, or empty).
classify_exit() {
    local rc=$1 messages=$2 signalled=${3:-} outcomes="" line node="" what="" task code
    local final="" exited="" own="" signal="" failure=""
    VERDICT=final CODE=$rc WHY="" WHERE="" FAILED_NODE=""
    if [[ -r $messages ]]; then
        # The outcome lines, up to srun's own ending of the step.
        outcomes=$(sed '/^srun: .*First task exited/,$d' "$messages" \
            | grep -E '^srun: error: ([^ :]+: tasks? [0-9,-]+: .+|Node failure on [^ ]+.*|Task launch for .* failed on node [^ :]+.*)$')
    fi
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        if [[ $line =~ ^srun:\ error:\ ([^ :]+):\ (tasks?\ [0-9,-]+):\ Exited\ with\ exit\ code\ ([0-9]+)$ ]]; then
            task="${BASH_REMATCH[1]} ${BASH_REMATCH[2]}" code=${BASH_REMATCH[3]}
            [[ -z $exited ]] && exited=$code
            [[ -z $own && $code != 8 ]] && own=$code  # 8: a lost peer, the consequence of another's end
            if [[ -z $final ]] && ((code >= 2 && code <= 7)); then
                final=$code WHERE="$task: Exited with exit code $code"
            fi
        elif [[ $line =~ Node\ failure\ on\ ([^ ]+) || $line =~ failed\ on\ node\ ([^ :]+) ]]; then
            [[ -z $failure ]] && failure=${BASH_REMATCH[1]} what=${line#srun: error: }
        elif [[ $line =~ ^srun:\ error:\ ([^ :]+):\ (tasks?\ [0-9,-]+):\ (.+)$ && -z $signal ]]; then
            signal=${BASH_REMATCH[3]} node=${BASH_REMATCH[1]} what="${BASH_REMATCH[1]} ${BASH_REMATCH[2]}: ${BASH_REMATCH[3]}"
        fi
    done <<<"$outcomes"

    if ((rc == 0)); then
        VERDICT=finished WHY="training finished (exit 0)"
    elif ((rc == 75)); then
        VERDICT=requeue WHY="checkpoint saved after ${signalled:+SIG$signalled}${signalled:-a signal to the tasks} (exit 75)"
    elif [[ -n $final ]]; then
        # A task ended with a code of its own: that code is the job's, whatever srun says of the others.
        CODE=$final WHY=$(final_reason "$final")
    elif [[ -n $failure ]]; then
        VERDICT=requeue FAILED_NODE=$failure WHERE=$what WHY="srun reported a node failure on $failure (exit $rc)"
    elif [[ $signal == "Out Of Memory"* ]] || { [[ -r $messages ]] && grep -qE 'oom-kill|OUT_OF_MEMORY' "$messages"; }; then
        # The kernel's out-of-memory killer (through SLURM's cgroup): the same settings would run out again.
        WHERE=$what WHY="a task ran out of host memory: ask for more (sbatch --mem=...) or use less (data workers, offload)"
    elif [[ -n $signal ]] || { [[ -z $exited ]] && ((rc > 128 && rc <= 128 + 64)); }; then
        # (A signal with no line for it but tasks that exited: srun ended them after --wait, below.)
        # Killed by a signal from outside the run: a kill -9 (137), the node going away, an NCCL abort (134).
        VERDICT=requeue FAILED_NODE=$node WHERE=$what
        if [[ -n $signal ]]; then
            WHY="a training task was killed by a signal on $node ($signal, exit $rc)"
        else
            WHY="a training task was killed by signal $((rc - 128)) (exit $rc)"
        fi
        if [[ -n $signalled ]]; then  # ours, passed on before the trainer handled it: no node to blame
            WHY="$WHY after SIG$signalled was passed on to the tasks"
            FAILED_NODE=""
        fi
    elif [[ -z $own ]] && { [[ $exited == 8 ]] || ((rc == 8)); }; then
        VERDICT=requeue WHY="every task that ended lost the connection to another (exit 8) and none failed on its own: the network between the nodes?"
    else
        CODE=${own:-${exited:-$rc}}
        WHY=$(final_reason "$CODE")
    fi
}

# exclude_decision NODE NEEDED
#   Whether the restart can leave NODE (a name, or a hostlist such as n[3-4] from a node failure
#   line) out and still be scheduled with NEEDED nodes. Sets EXCLUDE
#   (the new ExcNodeList, or empty for no exclusion) and EXCLUDE_WHY (one line for the log).
exclude_decision() {
    local node=$1 needed=$2 job requested excluded partitions usable
    EXCLUDE="" EXCLUDE_WHY=""
    job=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)
    requested=$(sed -n 's/.* ReqNodeList=\([^ ]*\).*/\1/p' <<<"$job")
    excluded=$(sed -n 's/.* ExcNodeList=\([^ ]*\).*/\1/p' <<<"$job")
    partitions=$(sed -n 's/.* Partition=\([^ ]*\).*/\1/p' <<<"$job")
    [[ $requested == "(null)" ]] && requested=""
    [[ $excluded == "(null)" ]] && excluded=""
    if [[ -n $requested ]] && scontrol show hostnames "$requested" | grep -qxF -f <(scontrol show hostnames "$node"); then
        EXCLUDE_WHY="$node not excluded: the job asked for it by name (--nodelist=$requested)"
        return
    fi
    # Nodes of the job's partitions that can run jobs, less those excluded already and this one.
    usable=$(sinfo -h -N ${partitions:+-p "$partitions"} -o '%N %t' 2>/dev/null \
        | grep -E ' (idle|mix|alloc|comp|plnd)$' | cut -d' ' -f1 | sort -u \
        | grep -vxF -f <( (scontrol show hostnames "$node"; [[ -n $excluded ]] && scontrol show hostnames "$excluded") ) | wc -l)
    if ((usable >= needed)); then
        EXCLUDE=${excluded:+$excluded,}$node
        EXCLUDE_WHY="excluding $node from the restart (ExcNodeList=$EXCLUDE): $usable other usable node(s) in partition ${partitions:-?} for the $needed the job needs"
    else
        EXCLUDE_WHY="$node not excluded: the job needs $needed node(s) and partition ${partitions:-?} has only $usable other usable one(s)${excluded:+ besides the excluded $excluded}; excluding it would leave the job unschedulable"
    fi
}
