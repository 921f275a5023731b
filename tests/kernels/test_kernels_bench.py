"""`pytest -m bench`: runs benchmarks/bench_kernels.py (each case in its own process) and prints the table.

Numbers are reported, not asserted (targets in docs/kernels.md). On a CUDA machine run it with
SCPO_TEST_CUDA=1 so the interpreter stays off and the Triton kernels are compiled.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.mark.bench
def test_kernels_bench(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # benchmarks/gpu_check.py passes extra arguments (--quick) and a JSON path for the rows
    argv = os.environ.get("SCPO_BENCH_ARGS", "").split()
    if os.environ.get("SCPO_BENCH_JSON"):
        argv += ["--json", os.environ["SCPO_BENCH_JSON"]]
    assert mod.main(argv) == 0
    with capsys.disabled():
        print(capsys.readouterr().out)
