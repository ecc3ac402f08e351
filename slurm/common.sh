# Shared by the sbatch scripts in slurm/: `source`d, then `launch_training "$@"`.
#
# One process per GPU started by srun; rank, local rank and world size come from srun's
# SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (pipeline/distributed.py), the rendezvous
# from MASTER_ADDR / MASTER_PORT set here from the job's node list and id.
#
# Preemption and time limits, one design:
#   * `#SBATCH --signal=USR1@300` (no "B:"): 300 s before the time limit slurmd sends SIGUSR1 to
#     every task of the running steps, i.e. every trainer process, not to this batch shell.
#     SLURM's own preemption (PreemptMode=REQUEUE/CANCEL) sends SIGTERM to the same processes.
#   * The trainer (pipeline/train/preemption.py) finishes its step, rank 0 writes a synchronous
#     checkpoint, every rank exits with 75 (EX_TEMPFAIL), so srun exits with 75.
#   * This shell sees 75 (or 138: SIGUSR1 came before the trainer was ready) and runs
#     `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue with the same id, output
#     file (--open-mode=append) and arguments. The next start passes resume=auto like every
#     start, so it continues from the newest valid checkpoint.
#   * A signal sent to this shell instead (`--signal=B:USR1@...`, `scancel --batch
#     --signal=USR1`) is forwarded to srun, which passes it to every task: same path.
#
# Environment variables (all optional; the config file's values are kept when unset):
#   CONFIG             the run config (each script sets its own default)
#   DATA_ROOT          -> data.root          ImageNet layout: DATA_ROOT/{train,val}/<wnid>/*.JPEG
#   CKPT_URL           -> checkpoint.url     e.g. s3://my-bucket/anytime/<run name>
#   CKPT_ENDPOINT_URL  -> checkpoint.endpoint_url   an S3-compatible server (MinIO, Ceph)
#   OUT_DIR            -> out_dir            logs, metrics, results (default: the config's runs/)
#   PYTHON             the interpreter (default: python3; activate a venv before sbatch instead)
#   MASTER_PORT        rendezvous port (default: 20000 + job id mod 20000)
#   REPO               the checkout (default: the folder sbatch was run from)
# S3 credentials come from the usual AWS_* variables or ~/.aws, exported before sbatch.

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python3}

launch_training() {
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "slurm/common.sh: not inside a SLURM job; submit with sbatch slurm/<script>.sh" \
             "(on one machine without SLURM: torchrun ... -m pipeline train --config ...)" >&2
        exit 2
    fi
    cd "$REPO" || { echo "slurm/common.sh: cannot cd to REPO=$REPO" >&2; exit 2; }
    if [[ -z "${CONFIG:-}" || ! -f "$CONFIG" ]]; then
        echo "slurm/common.sh: config '${CONFIG:-}' not found in $REPO; set CONFIG=configs/..." >&2
        exit 2
    fi
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
    gpus=${gpus##*:}  # "a100:4" -> 4
    if [[ ! "$gpus" =~ ^[0-9]+$ ]]; then
        echo "slurm/common.sh: cannot read the GPUs per node from '$gpus'; submit with" \
             "--gpus-per-node=N (not --gpus=TOTAL)" >&2
        exit 2
    fi
    local tasks tasks_per_node layout=()
    read -r tasks tasks_per_node < <(task_layout "$nodes" "$gpus")
    [[ -n "$tasks_per_node" ]] && layout=(--ntasks-per-node="$tasks_per_node")
    if (( gpus > 0 && tasks_per_node != gpus )); then
        echo "slurm/common.sh: $gpus GPUs per node but $tasks_per_node tasks per node; one" \
             "process per GPU needs --ntasks-per-node=$gpus, or no --ntasks-per-node" >&2
        exit 2
    fi

    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    export PYTHONUNBUFFERED=1  # progress lines reach the log file as they are printed
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_PER_GPU:-1}}}

    local overrides=()
    [[ -n "${DATA_ROOT:-}" ]] && overrides+=("data.root=$DATA_ROOT")
    [[ -n "${CKPT_URL:-}" ]] && overrides+=("checkpoint.url=$CKPT_URL")
    [[ -n "${CKPT_ENDPOINT_URL:-}" ]] && overrides+=("checkpoint.endpoint_url=$CKPT_ENDPOINT_URL")
    [[ -n "${OUT_DIR:-}" ]] && overrides+=("out_dir=$OUT_DIR")
    # The script's arguments win over the variables; resume=auto comes last so that every
    # start, first or requeued, continues from the newest valid checkpoint if there is one.
    overrides+=("$@" "resume=auto")

    echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)):" \
         "$nodes node(s), $tasks task(s), ${gpus} GPU(s)/node, rendezvous" \
         "$MASTER_ADDR:$MASTER_PORT, $CONFIG ${overrides[*]}"

    # --kill-on-bad-exit=0: on preemption every rank exits 75 after rank 0's save; none may be
    # killed early because another one exited first. --cpus-per-task: sbatch's, or its
    # --cpus-per-gpu (one task per GPU); srun does not inherit it since Slurm 22.05.
    srun --kill-on-bad-exit=0 --nodes="$nodes" --ntasks="$tasks" "${layout[@]}" \
         --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_PER_GPU:-1}}" \
         "$PYTHON" -m pipeline train --config "$CONFIG" "${overrides[@]}" &
    SRUN_PID=$!
    trap 'forward_signal USR1' USR1
    trap 'forward_signal TERM' TERM
    local rc
    while :; do  # a trapped signal interrupts `wait`; wait again until srun itself has ended
        wait "$SRUN_PID"
        rc=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break
    done
    trap - USR1 TERM

    # 75: the trainer saved and asks to be requeued. 138 = 128 + SIGUSR1: the signal came
    # before the trainer had set up its handler (still starting): nothing new to save.
    if (( rc == 75 || rc == 138 )); then
        echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID preempted (exit $rc): requeueing"
        if scontrol requeue "$SLURM_JOB_ID"; then
            sleep 120  # SLURM ends this run now; exiting first could record it as finished
        else
            echo "slurm/common.sh: scontrol requeue failed (submitted with --no-requeue?);" \
                 "submit the same command again: resume=auto continues from the checkpoint" >&2
        fi
    fi
    echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID: training exited with $rc"
    exit "$rc"
}

task_layout() {
    # "TASKS [TASKS_PER_NODE]" for this start of the job on $1 nodes with $2 GPUs per node; a
    # requeue may change it (`--nodes=1-2` on fewer free nodes, `scontrol update JobId=...
    # NumTasks=1` on the pending job). With GPUs and no --ntasks-per-node: one task per GPU on
    # every node (a node range with --ntasks-per-node would fix the task count at submission,
    # and so take the fewest nodes). Else the allocation's own count: SLURM_TASKS_PER_NODE
    # ("4(x2)", "2,1") is this start's, while SLURM_NTASKS keeps the count given at submission.
    local nodes=$1 gpus=$2 per_node=${SLURM_NTASKS_PER_NODE:-}
    [[ -z "$per_node" ]] && (( gpus > 0 )) && per_node=$gpus
    if [[ -n "$per_node" ]]; then
        echo "$(( nodes * per_node )) $per_node"
    else
        allocated_tasks "${SLURM_TASKS_PER_NODE:-1}"
    fi
}

allocated_tasks() {
    # "4(x2),1" -> 9: the tasks of SLURM_TASKS_PER_NODE's node groups, summed.
    local total=0 group count repeat
    local IFS=,
    for group in $1; do
        count=${group%%(*}
        repeat=1
        [[ $group == *"(x"* ]] && { repeat=${group##*(x}; repeat=${repeat%)}; }
        total=$(( total + count * repeat ))
    done
    echo "$total"
}

forward_signal() {
    # This batch shell was signalled: srun passes the signal on to every trainer process.
    echo "[$(date -u +%FT%TZ)] batch shell got SIG$1: forwarding SIGUSR1 to the tasks"
    kill -USR1 "$SRUN_PID" 2>/dev/null
}
