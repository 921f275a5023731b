#!/usr/bin/env bash
# Per-node supervisor: srun starts one of these on every node of a step (launch/local.sh runs it directly).
#
# It asks the planner for this node's processes (`launch_plan --emit-node-cmd`), starts the services
# (SGLang servers, router), waits until they and any remote dependencies (the router of the rollout nodes)
# answer /health, then starts the main process (the torchrun trainer). Any process that dies with an error,
# or a service that exits while training runs, stops everything on the node and exits non-zero, so srun's
# --kill-on-bad-exit and the batch script tear the whole job down instead of hanging.
#
# Needs: SCPO_PLAN (plan JSON), SCPO_LOG_DIR; SCPO_NODE (default: SLURMD_NODENAME).
set -uo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCPO_NODE="${SCPO_NODE:-${SLURMD_NODENAME:-$(hostname -s)}}"
export SCPO_NODE
: "${SCPO_PLAN:?SCPO_PLAN is not set}" "${SCPO_LOG_DIR:?SCPO_LOG_DIR is not set}"
scpo_env_presets
node_dir="$SCPO_LOG_DIR/$SCPO_NODE"
mkdir -p "$node_dir"
# Everything this supervisor says goes to LOG_DIR/node-NAME.log and to srun's stdout (the job log).
# tee ignores TERM/INT so the supervisor can still report while it stops everything.
exec > >(trap '' TERM INT; exec tee -a "$SCPO_LOG_DIR/node-$SCPO_NODE.log") 2>&1

lines="$("${SCPO_PYTHON:-python3}" -m megatron_scpo.launch_plan --emit-node-cmd --plan "$SCPO_PLAN" --node "$SCPO_NODE")" \
    || scpo_fail 2 "no plan for node $SCPO_NODE in $SCPO_PLAN"

declare -A name_of=() kind_of=()
services=() mains=() health=() waits=() pending_mains=()
while IFS=$'\t' read -r kind a b cmd; do
    case "$kind" in
        wait) waits+=("$a") ;;
        service | main)
            if [ "$kind" = main ]; then
                pending_mains+=("$a"$'\t'"$cmd")
            else
                services+=("$a"$'\t'"$cmd")
                [ "$b" != "-" ] && health+=("$b")
            fi
            ;;
        "") ;;
        *) scpo_fail 2 "bad plan line: $kind" ;;
    esac
done <<<"$lines"

pids=()
start_proc() {  # kind name cmd: own process group (setsid) so stopping it stops its children too
    local kind=$1 name=$2 cmd=$3
    scpo_log "start $kind $name: $cmd"
    setsid bash -c "exec $cmd" >"$node_dir/$name.log" 2>&1 </dev/null &
    local pid=$!
    name_of[$pid]=$name
    kind_of[$pid]=$kind
    pids+=("$pid")
    [ "$kind" = main ] && mains+=("$pid")
}

stop_all() {  # TERM every process group, wait up to SCPO_NODE_GRACE seconds, then KILL
    local pid i grace=${SCPO_NODE_GRACE:-60}
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
    for ((i = 0; i < grace * 2; i++)); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.5
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null; done
}

fail() {  # rc message: show the failing log's tail, stop the node, exit rc
    local rc=$1 log=${3:-}
    scpo_log "ERROR: $2" >&2
    if [ -n "$log" ] && [ -f "$log" ]; then
        echo "----- tail $log -----" >&2
        tail -n 30 "$log" >&2
    fi
    stop_all
    exit "$rc"
}

trap 'scpo_log "stop requested (signal): stopping processes"; stop_all; exit 143' TERM INT

for entry in "${services[@]}"; do start_proc service "${entry%%$'\t'*}" "${entry#*$'\t'}"; done

# Health: local services and remote dependencies must answer before the trainer starts; a service that
# dies meanwhile fails the node at once instead of waiting out the timeout.
urls=("${health[@]}" "${waits[@]}")
if [ ${#urls[@]} -gt 0 ]; then
    limit=${SCPO_HEALTH_TIMEOUT:-900}
    start=$(date +%s)
    scpo_log "waiting for ${#urls[@]} endpoint(s) to be healthy (limit ${limit}s): ${urls[*]}"
    probe=$((limit < 10 ? limit : 10))
    until "${SCPO_PYTHON:-python3}" -m megatron_scpo.launch_plan --wait-healthy "${urls[@]}" --timeout "$probe" 2>/dev/null; do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || fail 1 "${name_of[$pid]} died during start-up" "$node_dir/${name_of[$pid]}.log"
        done
        (($(date +%s) - start > limit)) && fail 1 "not healthy after ${limit}s: ${urls[*]}"
    done
    scpo_log "healthy after $(($(date +%s) - start))s"
fi

for entry in "${pending_mains[@]}"; do start_proc main "${entry%%$'\t'*}" "${entry#*$'\t'}"; done
[ ${#pids[@]} -gt 0 ] || scpo_fail 2 "the plan gives node $SCPO_NODE nothing to run"

# Supervise: a main exiting 0 is done; anything else exiting ends the node with an error.
remaining=${#mains[@]}
while true; do
    scpo_wait_any "${pids[@]}"
    rc=$?
    done_pid=${SCPO_DONE_PID:-}
    [ -n "$done_pid" ] || continue
    name=${name_of[$done_pid]}
    new=()
    for pid in "${pids[@]}"; do [ "$pid" != "$done_pid" ] && new+=("$pid"); done
    pids=("${new[@]}")
    if [ "${kind_of[$done_pid]}" = main ] && [ "$rc" = 0 ]; then
        remaining=$((remaining - 1))
        scpo_log "$name finished"
        if [ "$remaining" -eq 0 ]; then
            stop_all
            scpo_log "node done"
            exit 0
        fi
    elif [ "${kind_of[$done_pid]}" = main ]; then
        fail "$rc" "$name exited with code $rc" "$node_dir/$name.log"
    else
        fail 1 "service $name exited (code $rc) while the job runs" "$node_dir/$name.log"
    fi
done
