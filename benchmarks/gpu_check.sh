#!/usr/bin/env bash
# GPU check (docs/kernels.md, "GPU check"): install carried wheels, then run benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--quick] [more gpu_check.py options]
#
# No network: wheels (megatron-core, math-verify and its deps, ... built for this machine's Python) are taken
# from shared/wheels or benchmarks/wheels when one exists (pip --no-index); without them the sections that need
# them are reported as skipped. The repo is used in place: scpo_kernels is reached through a symlink on
# PYTHONPATH (no pip install of the package itself). Results: OUT_DIR (default $OUT, else ./gpu_check_out)
# gets gpu_check.json and gpu_check.md. Whole run: < 8 minutes on one H200 (--budget-s 450 for the sections).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
if [[ $# -gt 0 && "$1" != --* ]]; then OUT_DIR="$1"; shift; fi
mkdir -p "$OUT_DIR/work"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then  # the interpreter that has torch ($PYTHON overrides)
  for c in python3 python; do if "$c" -c "import torch" 2> /dev/null; then PY="$c"; break; fi; done
fi
PY="${PY:-python3}"
WHEELS_LOG="$OUT_DIR/work/wheels.log"
: > "$WHEELS_LOG"
for d in "$REPO/shared/wheels" "$REPO/benchmarks/wheels"; do
  if [[ -n "${SCPO_GPU_CHECK_NO_INSTALL:-}" ]]; then
    echo "SCPO_GPU_CHECK_NO_INSTALL set: no wheel installed" >> "$WHEELS_LOG"; break
  fi
  if compgen -G "$d/*.whl" > /dev/null; then
    echo "installing wheels from $d: $(cd "$d" && ls *.whl | tr '\n' ' ')" | tee -a "$WHEELS_LOG"
    # all together, dependencies resolved inside the dir; if that fails (a dependency missing there, a wheel
    # for another Python), each wheel alone without dependencies, so one bad wheel does not block the rest
    if ! "$PY" -m pip install -q --no-index --find-links "$d" "$d"/*.whl >> "$WHEELS_LOG" 2>&1; then
      echo "pip with dependencies failed; installing one by one with --no-deps" | tee -a "$WHEELS_LOG"
      for w in "$d"/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps "$w" >> "$WHEELS_LOG" 2>&1 \
          && echo "  installed $(basename "$w")" | tee -a "$WHEELS_LOG" \
          || echo "  FAILED $(basename "$w") (see $WHEELS_LOG)" | tee -a "$WHEELS_LOG"
      done
    fi
  fi
done
[[ -s "$WHEELS_LOG" ]] || echo "no wheel dir (shared/wheels, benchmarks/wheels): using what is installed" | tee -a "$WHEELS_LOG"
SHIM="$OUT_DIR/work/pyshim"
mkdir -p "$SHIM"
if ! "$PY" -c "import scpo_kernels" 2> /dev/null; then ln -sfn "$REPO/kernels" "$SHIM/scpo_kernels"; fi
export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export SCPO_GPU_CHECK_WHEELS_LOG="$WHEELS_LOG" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
cd "$REPO"
exec "$PY" "$REPO/benchmarks/gpu_check.py" --out "$OUT_DIR" "$@"
