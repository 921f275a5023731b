# shellcheck shell=bash
# Shared logic of launch/*.slurm, launch/node.sh and launch/local.sh. Sourced, never executed.
#
# The plan itself (which node runs what, ranks, ports, TP/PP/DP checks) lives in one place:
# megatron_scpo/launch_plan.py. This file only resolves the job's environment, hands it to the planner,
# starts one supervisor (launch/node.sh) per node through srun, and fails the job fast when any part dies.
#
# Knobs (environment; every one has a default):
#   SCPO_HOME            repo checkout on the shared filesystem (default: sbatch's submit dir)
#   SCPO_PYTHON          interpreter with megatron_scpo installed (default: python3)
#   SCPO_CONFIG          experiment YAML (each .slurm script sets its own default)
#   SCPO_RUN_DIR         run directory; keep it fixed across requeues to resume (default: runs/<job-name>-<job-id>)
#   SCPO_ROLLOUT_NODES   nodes reserved for SGLang servers + router (default set by the .slurm script)
#   SCPO_COLOCATE=1      SGLang servers share the training GPUs instead
#   SCPO_CPU=1           test mode: gloo, no GPUs, in-process rollout engine
#   SCPO_GPUS_PER_NODE   GPUs per node (default: from SLURM; CPU mode: processes per node, default 2)
#   SCPO_MASTER_PORT     torch.distributed port (default 20000 + job id % 10000: jobs sharing a node differ)
#   SCPO_HEALTH_TIMEOUT  seconds for SGLang servers / router to become healthy (default 900)
#   SCPO_JOB_TIMEOUT     hard wall-clock limit in seconds on top of --time (default 0 = off)
#   SCPO_STALL_TIMEOUT   fail when RUN_DIR/metrics.jsonl has not changed for this long (default 0 = off)
#   SCPO_STOP_GRACE      seconds the trainer gets to exit after a stop request (default 90)
#   SCPO_DRY_RUN=1       print the plan the job would run and exit (no srun)
#   SCPO_HOSTNAMES / SCPO_ADDRESSES  comma lists overriding `scontrol show hostnames` / NodeAddr

scpo_log() { echo "[scpo $(date +%H:%M:%S) ${SCPO_NODE:-${SLURMD_NODENAME:-$(hostname -s)}}] $*"; }
scpo_fail() {  # scpo_fail RC MESSAGE: one clear line on stderr, then exit RC
    local rc=$1
    shift
    scpo_log "ERROR: $*" >&2
    exit "$rc"
}

# NCCL / IB / torch.distributed presets. Every value can be overridden by exporting it before sbatch.
scpo_env_presets() {
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    if [ "${SCPO_CPU:-0}" = "1" ]; then
        # CPU test mode: gloo over loopback/ethernet, one thread per rank (cores are shared by all ranks).
        export SCPO_CPU=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
        return
    fi
    # Megatron needs in-order kernel launches for TP/SP communication overlap.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # A collective that times out tears the process down (instead of hanging the job until --time).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # Flight recorder: on a timeout every rank dumps its last collectives to LOG_DIR/nccl_trace_rank_<r>,
    # which tells which rank/collective hung (second rollout, weight sync, ...).
    export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
    export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE="${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-${SCPO_LOG_DIR:-/tmp}/nccl_trace_rank_}"
    # Watchdog heartbeat: a rank stuck outside NCCL (e.g. a dead rollout server) is reported, not silent.
    export TORCH_NCCL_ENABLE_MONITORING="${TORCH_NCCL_ENABLE_MONITORING:-1}"
    export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-900}"
    # WARN prints the transport chosen at init (IB vs socket) without flooding the logs; INFO when debugging.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # InfiniBand: longer retransmit timeout (4.096us * 2^22 ~ 17s) rides out fabric hiccups on big jobs.
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
    # Cluster specific, so only set when given: the NIC for bootstrap/socket traffic (a wrong one hangs
    # init) and the IB HCAs to use (e.g. mlx5_0,mlx5_1,...; exclude the storage NIC).
    if [ -n "${SCPO_SOCKET_IFNAME:-}" ]; then
        export NCCL_SOCKET_IFNAME="$SCPO_SOCKET_IFNAME" GLOO_SOCKET_IFNAME="$SCPO_SOCKET_IFNAME"
    fi
    if [ -n "${SCPO_IB_HCA:-}" ]; then export NCCL_IB_HCA="$SCPO_IB_HCA"; fi
    # Without InfiniBand (cloud ethernet): SCPO_NO_IB=1 keeps NCCL from probing IB devices.
    if [ "${SCPO_NO_IB:-0}" = "1" ]; then export NCCL_IB_DISABLE=1; fi
}

# Resolve paths, node lists and sizes from SLURM variables (or SCPO_* overrides for dry runs).
scpo_resolve() {
    SCPO_HOME="$(cd "${SCPO_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)" || scpo_fail 2 "SCPO_HOME not found"
    [ -f "$SCPO_HOME/launch/node.sh" ] || scpo_fail 2 "SCPO_HOME=$SCPO_HOME has no launch/node.sh (submit from the repo root or set SCPO_HOME)"
    cd "$SCPO_HOME" || exit 2
    export SCPO_HOME SCPO_PYTHON="${SCPO_PYTHON:-python3}"
    [ -n "${SCPO_CONFIG:-}" ] || scpo_fail 2 "SCPO_CONFIG is not set"
    [ -f "$SCPO_CONFIG" ] || scpo_fail 2 "config file not found: $SCPO_CONFIG (cwd $SCPO_HOME)"

    local job="${SLURM_JOB_ID:-local$$}"
    SCPO_RUN_DIR="${SCPO_RUN_DIR:-runs/${SLURM_JOB_NAME:-scpo}-$job}"
    mkdir -p "$SCPO_RUN_DIR" || scpo_fail 2 "cannot create run dir $SCPO_RUN_DIR"
    SCPO_RUN_DIR="$(cd "$SCPO_RUN_DIR" && pwd)"
    # One log dir per attempt: a requeued job (same id) gets -r1, -r2, ... and keeps earlier logs.
    SCPO_LOG_DIR="$SCPO_RUN_DIR/logs/job-$job-r${SLURM_RESTART_COUNT:-0}"
    mkdir -p "$SCPO_LOG_DIR"
    export SCPO_RUN_DIR SCPO_LOG_DIR SCPO_PLAN="$SCPO_LOG_DIR/plan.json"
    export SCPO_STOP_FILE="$SCPO_RUN_DIR/STOP"  # the trainer polls it: saves a checkpoint, exits 143
    # torchrun SIGKILLs its ranks 30 s after forwarding SIGTERM unless told otherwise; give them the same
    # grace as the trainer so the preemption checkpoint can finish (read by torch >= 2.9; older ignore it).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${SCPO_STOP_GRACE:-90}}"

    if [ -n "${SCPO_HOSTNAMES:-}" ]; then
        SCPO_HOSTS="$SCPO_HOSTNAMES"
    else
        [ -n "${SLURM_JOB_NODELIST:-}" ] || scpo_fail 2 "not inside a SLURM job (no SLURM_JOB_NODELIST); set SCPO_HOSTNAMES for a dry run"
        SCPO_HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)"
    fi
    if [ -n "${SCPO_ADDRESSES:-}" ]; then
        SCPO_ADDRS="$SCPO_ADDRESSES"
    else
        # NodeAddr (what other nodes can reach) may differ from the node name; fall back to the name.
        local h addr addrs=()
        for h in ${SCPO_HOSTS//,/ }; do
            addr="$(scontrol show node -o "$h" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')"
            addrs+=("${addr:-$h}")
        done
        SCPO_ADDRS="$(IFS=,; echo "${addrs[*]}")"
    fi
    local nhosts
    nhosts="$(echo "$SCPO_HOSTS" | tr ',' '\n' | grep -c .)"
    SCPO_NODES="${SLURM_JOB_NUM_NODES:-$nhosts}"
    [ "$SCPO_NODES" = "$nhosts" ] || scpo_fail 2 "SLURM_JOB_NUM_NODES=$SCPO_NODES but node list has $nhosts: $SCPO_HOSTS"

    if [ -z "${SCPO_GPUS_PER_NODE:-}" ]; then
        if [ "${SCPO_CPU:-0}" = "1" ]; then
            SCPO_GPUS_PER_NODE=2
        elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
            SCPO_GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
        elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
            SCPO_GPUS_PER_NODE="${SLURM_GPUS_PER_NODE##*:}"  # "8" or "h100:8"
        else
            scpo_fail 2 "cannot tell GPUs per node (no SLURM_GPUS_ON_NODE); set SCPO_GPUS_PER_NODE"
        fi
    fi
    if [ -z "${SCPO_MASTER_PORT:-}" ]; then
        if [[ "$job" =~ ^[0-9]+$ ]]; then SCPO_MASTER_PORT=$((20000 + job % 10000)); else SCPO_MASTER_PORT=29500; fi
    fi
    if [ "${SCPO_CPU:-0}" = "1" ]; then SCPO_ROLLOUT_NODES=0 SCPO_COLOCATE=0; fi
    export SCPO_HOSTS SCPO_ADDRS SCPO_NODES SCPO_GPUS_PER_NODE SCPO_MASTER_PORT
}

# Validate + write the plan (LOG_DIR/plan.json, plan.env, plan.txt). Fails before any srun or model load.
scpo_make_plan() {  # args: config overrides
    local flags=(--nodes "$SCPO_NODES" --gpus-per-node "$SCPO_GPUS_PER_NODE"
        --rollout-nodes "${SCPO_ROLLOUT_NODES:-0}" --hostnames "$SCPO_HOSTS" --addresses "$SCPO_ADDRS"
        --master-port "$SCPO_MASTER_PORT" --run-dir "$SCPO_RUN_DIR" --python "$SCPO_PYTHON"
        --torchrun-log-dir "$SCPO_LOG_DIR/ranks" --write-plan "$SCPO_PLAN")
    if [ "${SCPO_COLOCATE:-0}" = "1" ]; then flags+=(--colocate); fi
    if [ "${SCPO_CPU:-0}" = "1" ]; then flags+=(--cpu); fi
    "$SCPO_PYTHON" -m megatron_scpo.launch_plan "$SCPO_CONFIG" "$@" "${flags[@]}" >"$SCPO_LOG_DIR/plan.txt" \
        || scpo_fail 2 "the plan does not fit this allocation (see the error above); nothing was started"
    cat "$SCPO_LOG_DIR/plan.txt"
    # shellcheck disable=SC1090
    source "${SCPO_PLAN%.json}.env"
}

# wait for any of PIDS; sets SCPO_DONE_PID (empty when a trapped signal interrupted the wait) and returns its
# exit code. bash >= 5.1 has `wait -n -p`; older bash (RHEL 8 ships 4.4) finds the reaped pid by probing
# (SCPO_WAIT_COMPAT=1 forces that path, for tests).
scpo_wait_any() {
    local rc pid
    SCPO_DONE_PID=""
    if [ "${SCPO_WAIT_COMPAT:-0}" != 1 ] && ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))); then
        wait -n -p SCPO_DONE_PID "$@"
        return $?
    fi
    wait -n "$@"
    rc=$?
    for pid in "$@"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            SCPO_DONE_PID=$pid
            break
        fi
    done
    return "$rc"
}

# Stop a background job given by pid: TERM, up to GRACE seconds, then KILL.
scpo_stop_pid() {  # pid grace
    local pid=$1 grace=${2:-30} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace * 2; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null
    return 0
}

# Background timers of the batch script. Each returns once its condition holds, and returns 1 as soon as the
# batch shell ($$ inside a subshell) is gone, so a timer never outlives its job.
scpo_job_timer() {  # seconds
    local end=$((SECONDS + $1))
    while ((SECONDS < end)); do
        kill -0 $$ 2>/dev/null || return 1
        sleep 2
    done
}

# Returns once RUN_DIR/metrics.jsonl has not changed for SCPO_STALL_TIMEOUT seconds (a hung collective).
scpo_stall_watchdog() {
    local limit=$1 metrics="$SCPO_RUN_DIR/metrics.jsonl" last now
    last=$(date +%s)
    while sleep $((limit < 60 ? 2 : 10)); do
        kill -0 $$ 2>/dev/null || return 1
        now=$(date +%s)
        if [ -f "$metrics" ]; then
            local m
            m=$(stat -c %Y "$metrics")
            ((m > last)) && last=$m
        fi
        if ((now - last > limit)); then
            scpo_log "watchdog: no progress in $metrics for $((now - last))s (limit $limit)" >&2
            return 0
        fi
    done
}

scpo_tail_logs() {  # show the end of every process log of this attempt (failure context in the job log)
    local f
    for f in "$SCPO_LOG_DIR"/node-*.log "$SCPO_LOG_DIR"/*/*.log; do
        [ -f "$f" ] || continue
        echo "----- tail ${f#"$SCPO_LOG_DIR"/} -----" >&2
        tail -n 20 "$f" >&2
    done
}

# The batch script body: plan, start one node supervisor per node, fail fast, requeue on USR1.
scpo_job_main() {  # args: config overrides (key.path=value)
    set -uo pipefail
    if [ "${SCPO_TRACE:-0}" = 1 ]; then set -x; fi
    scpo_resolve
    scpo_env_presets
    scpo_log "job ${SLURM_JOB_ID:-local} attempt ${SLURM_RESTART_COUNT:-0}: config=$SCPO_CONFIG run_dir=$SCPO_RUN_DIR"
    scpo_log "logs: $SCPO_LOG_DIR"
    scpo_make_plan "$@"
    if [ "${SCPO_DRY_RUN:-0}" = "1" ]; then
        scpo_log "SCPO_DRY_RUN=1: plan written to $SCPO_PLAN, nothing started"
        return 0
    fi
    local latest="$SCPO_RUN_DIR/checkpoints/latest"
    if [ -f "$latest" ]; then
        scpo_log "resuming: newest complete checkpoint is $(cat "$latest")"
    else
        scpo_log "no checkpoint in $SCPO_RUN_DIR/checkpoints: starting fresh"
    fi
    rm -f "$SCPO_STOP_FILE"

    # One supervisor task per node; a task that fails kills its whole step. Each writes LOG_DIR/node-NAME.log
    # and echoes into this job log.
    # --cpus-per-task: all of the node's cores (a step defaults to 1 CPU, and with task/cgroup every rank and
    # data worker would be pinned to that one core).
    local node_step=(--ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
        bash "$SCPO_HOME/launch/node.sh")
    local pid_train="" pid_rollout="" pid_timer="" pid_watch=""
    if [ "$SCPO_PLAN_ROLLOUT_NODES" -gt 0 ]; then
        srun --nodes="$SCPO_PLAN_ROLLOUT_NODES" --ntasks="$SCPO_PLAN_ROLLOUT_NODES" \
            --nodelist="$SCPO_PLAN_ROLLOUT_HOSTS" "${node_step[@]}" &
        pid_rollout=$!
    fi
    srun --nodes="$SCPO_PLAN_TRAIN_NODES" --ntasks="$SCPO_PLAN_TRAIN_NODES" \
        --nodelist="$SCPO_PLAN_TRAIN_HOSTS" "${node_step[@]}" &
    pid_train=$!
    if [ "${SCPO_JOB_TIMEOUT:-0}" -gt 0 ]; then
        scpo_job_timer "$SCPO_JOB_TIMEOUT" &
        pid_timer=$!
    fi
    if [ "${SCPO_STALL_TIMEOUT:-0}" -gt 0 ]; then
        scpo_stall_watchdog "$SCPO_STALL_TIMEOUT" &
        pid_watch=$!
    fi
    scpo_log "started: train step pid $pid_train${pid_rollout:+, rollout step pid $pid_rollout}"
    # Whatever ends this shell (including a bug), nothing it started may outlive it.
    # shellcheck disable=SC2064
    trap "kill $pid_train $pid_rollout $pid_timer $pid_watch 2>/dev/null" EXIT

    # USR1 (sbatch --signal=B:USR1@N before the time limit, or `scancel -b -s USR1`): ask the trainer to
    # stop (SIGTERM + STOP file), give it SCPO_STOP_GRACE seconds, then requeue this job. The next attempt
    # resumes from the newest complete checkpoint in the same run dir.
    SCPO_PREEMPT=0
    trap 'SCPO_PREEMPT=1' USR1
    trap 'SCPO_PREEMPT=2' TERM

    local done_pid rc all
    while true; do
        all=("$pid_train" $pid_rollout $pid_timer $pid_watch)
        scpo_wait_any "${all[@]}"
        rc=$?
        done_pid=${SCPO_DONE_PID:-}  # wait -n -p unsets it when a signal interrupts the wait
        if [ "$SCPO_PREEMPT" != 0 ]; then
            scpo_preempt "$pid_train" "$pid_rollout"
            rc=$?
            break
        fi
        [ -n "$done_pid" ] || continue
        if [ "$done_pid" = "$pid_train" ]; then
            if [ "$rc" = 0 ]; then scpo_log "training finished"; else scpo_log "ERROR: training step failed (rc=$rc)" >&2; fi
        elif [ "$done_pid" = "$pid_rollout" ]; then
            scpo_log "ERROR: rollout step exited (rc=$rc) while training runs: failing the job" >&2
            rc=1
        elif [ "$done_pid" = "$pid_timer" ]; then
            scpo_log "ERROR: SCPO_JOB_TIMEOUT=${SCPO_JOB_TIMEOUT}s reached: stopping the job" >&2
            rc=124
        elif [ "$done_pid" = "$pid_watch" ]; then
            scpo_log "ERROR: stall watchdog fired (SCPO_STALL_TIMEOUT=${SCPO_STALL_TIMEOUT}s): stopping the job" >&2
            rc=125
        fi
        break
    done
    trap - USR1 TERM
    local p
    for p in $pid_timer $pid_watch; do kill "$p" 2>/dev/null; done
    for p in "$pid_train" $pid_rollout; do scpo_stop_pid "$p" 30; done
    if [ "$rc" != 0 ]; then scpo_tail_logs; fi
    scpo_log "job exit code $rc"
    return "$rc"
}

scpo_preempt() {  # pid_train pid_rollout
    local pid_train=$1 pid_rollout=$2 grace=${SCPO_STOP_GRACE:-90} why="signal"
    [ "$SCPO_PREEMPT" = 1 ] && why="USR1 (time limit / preemption notice)"
    [ "$SCPO_PREEMPT" = 2 ] && why="TERM"
    scpo_log "$why: asking the trainer to stop (grace ${grace}s)"
    touch "$SCPO_STOP_FILE"
    # SIGTERM to the steps' tasks (node.sh stops its process groups in order) without cancelling the steps:
    # TERM to srun itself would cancel the step and SIGKILL after the cluster's KillWait.
    if [ -n "${SLURM_JOB_ID:-}" ]; then scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null; fi
    local i
    for ((i = 0; i < grace * 2; i++)); do
        kill -0 "$pid_train" 2>/dev/null || break
        sleep 0.5
    done
    scpo_stop_pid "$pid_train" 10
    [ -n "$pid_rollout" ] && scpo_stop_pid "$pid_rollout" 30
    # Only USR1 requeues: a plain TERM is scancel (or Slurm's own preemption, which requeues by itself).
    if [ "$SCPO_PREEMPT" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${SCPO_REQUEUE:-1}" = "1" ]; then
        scpo_log "requeueing job $SLURM_JOB_ID: the next attempt resumes from the newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID" || scpo_log "ERROR: scontrol requeue failed" >&2
    fi
    return 0
}
