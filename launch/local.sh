#!/usr/bin/env bash
# Single node, no SLURM: the same plan + node supervisor as the SLURM jobs, on this machine.
#
#   launch/local.sh CONFIG [--gpus N] [--cpu] [--colocate] [--run-dir DIR] [--dry-run] [key.path=value ...]
#
# --cpu runs N (default 2) gloo ranks without GPUs and the in-process rollout engine. --colocate starts
# SGLang servers + router on this node's GPUs before the trainer. Logs go to RUN_DIR/logs/job-local<pid>-r0/.
# RUN_DIR: --run-dir (keep it to resume), else a new runs/scpo-local<pid> per invocation.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) export SCPO_GPUS_PER_NODE="$2"; shift 2 ;;
        --cpu) export SCPO_CPU=1; shift ;;
        --colocate) export SCPO_COLOCATE=1; shift ;;
        --run-dir) export SCPO_RUN_DIR="$2"; shift 2 ;;
        --dry-run) export SCPO_DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "local.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            if [ -z "${SCPO_CONFIG_SET:-}" ]; then
                export SCPO_CONFIG="$1" SCPO_CONFIG_SET=1
            else
                overrides+=("$1")
            fi
            shift
            ;;
    esac
done
[ -n "${SCPO_CONFIG:-}" ] || { usage >&2; exit 2; }
SCPO_CONFIG="$(cd "$(dirname "$SCPO_CONFIG")" 2>/dev/null && pwd)/$(basename "$SCPO_CONFIG")"
export SCPO_CONFIG SCPO_HOME="${SCPO_HOME:-$(dirname "$here")}"
export SCPO_HOSTNAMES=localhost SCPO_ADDRESSES=127.0.0.1 SCPO_NODE=localhost
unset SLURM_JOB_NUM_NODES SLURM_JOB_NODELIST
if [ -z "${SCPO_GPUS_PER_NODE:-}" ] && [ "${SCPO_CPU:-0}" != "1" ]; then
    SCPO_GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
    [ "$SCPO_GPUS_PER_NODE" -gt 0 ] || scpo_fail 2 "no GPUs found (nvidia-smi); pass --gpus N or --cpu"
    export SCPO_GPUS_PER_NODE
fi

scpo_resolve
scpo_env_presets
scpo_make_plan "${overrides[@]}"
if [ "${SCPO_DRY_RUN:-0}" = "1" ]; then exit 0; fi
exec bash "$here/node.sh"
