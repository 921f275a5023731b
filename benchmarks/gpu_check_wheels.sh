#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the GPU machine (which has no network): run this on a
# machine with network, then carry benchmarks/wheels along (it is git-ignored: name it in the device run's
# `carry`, or copy it to shared/wheels). Target: the lent machine's Python (3.12 by default; PY_VER=3.11 ...).
# transformer-engine is not here: its torch extension is built against one torch/CUDA pair at install time
# (no offline wheel for torch 2.11), so the GPU check uses megatron's local spec and says so.
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/benchmarks/wheels}"
PY_VER="${PY_VER:-3.12}"
mkdir -p "$DEST"
python3 -m pip download -q --dest "$DEST" --only-binary=:all: --no-deps --python-version "$PY_VER" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  "megatron-core==0.16.1" "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" \
  "antlr4-python3-runtime==4.13.2" "psutil" "packaging>=24.2" \
  pytest pluggy iniconfig pygments hypothesis attrs sortedcontainers  # pytest -m bench (conftest: hypothesis)
ls -l "$DEST"
