#!/usr/bin/env bash
# One SGLang server (`python -m sglang.launch_server`) with the arguments our plans use.
#
#   launch/sglang_server.sh --model-path DIR [--host H] [--port P] [--tp N] [--mem-fraction F]
#                           [--base-gpu-id I] [--nccl-port P] [--dtype auto|bfloat16] [--context-length N]
#                           [--python PY] [-- extra sglang args]
#
# Why a wrapper: the planner (megatron_scpo/launch_plan.py) decides host/port/tp/GPU slice per server and
# calls this script; the exact SGLang flags live here once. Unknown options after `--` (or any unknown
# `--flag`) are passed through to SGLang unchanged. SCPO_SGLANG_PRINT_ONLY=1 prints the command instead of
# running it (used by tests and for checking a plan by hand). The interpreter is --python (the plan passes
# rollout.sglang.python: SGLang's own environment, e.g. /opt/sglang/bin/python), else $SCPO_PYTHON, else python3.
set -euo pipefail

model="" host="127.0.0.1" port=30000 tp=1 mem=0.85 base_gpu=0 nccl_port="" dtype="auto" python="${SCPO_PYTHON:-python3}"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model-path) model="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --tp) tp="$2"; shift 2 ;;
        --mem-fraction) mem="$2"; shift 2 ;;
        --base-gpu-id) base_gpu="$2"; shift 2 ;;
        --nccl-port) nccl_port="$2"; shift 2 ;;
        --dtype) dtype="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --context-length) extra+=(--context-length "$2"); shift 2 ;;
        --) shift; extra+=("$@"); break ;;
        *) extra+=("$1"); shift ;;
    esac
done
if [ -z "$model" ]; then
    echo "sglang_server.sh: --model-path is required" >&2
    exit 2
fi

cmd=("$python" -m sglang.launch_server
    --model-path "$model" --host "$host" --port "$port"
    --tp-size "$tp" --base-gpu-id "$base_gpu" --mem-fraction-static "$mem" --dtype "$dtype"
    --trust-remote-code)
# A fixed NCCL port per server: several servers on one node must not race for the same random port.
if [ -n "$nccl_port" ]; then cmd+=(--nccl-port "$nccl_port"); fi
cmd+=("${extra[@]}")

echo "+ ${cmd[*]@Q}" >&2
if [ "${SCPO_SGLANG_PRINT_ONLY:-0}" = "1" ]; then exit 0; fi
exec "${cmd[@]}"
