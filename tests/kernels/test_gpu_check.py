"""benchmarks/gpu_check.sh end to end in CPU mode (``--quick``): every section runs or says why it was skipped.

On this CPU-only machine the CUDA parts must come back ``skipped`` (the bench) or ``cpu-smoke`` (the kernels in the
Triton interpreter, Megatron's local spec on gloo, the trainer's RL step), never ``failed``, and the JSON and
Markdown results must be written where asked. ~60 s on 2 shared cores (three short subprocesses import megatron).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("SCPO_TEST_CUDA") == "1", reason="CPU-mode test (a GPU runs the real check)")
def test_gpu_check_cpu_mode_end_to_end(tmp_path: Path):
    out = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script decides per section
    env["SCPO_GPU_CHECK_NO_INSTALL"] = "1"  # never pip-install carried wheels into this machine's environment
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--quick"], env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    s = report["sections"]
    assert list(s) == ["env", "kernels", "megatron", "rl_step", "bench"]
    assert report["mode"] == "cpu quick"
    assert s["env"]["status"] == "ok" and s["env"]["results"]["cuda_available"] is False
    # CUDA-only parts are skipped with a reason; the rest ran its code on CPU
    assert s["bench"]["status"] == "skipped" and "no CUDA" in s["bench"]["reason"]
    for name in ("kernels", "megatron", "rl_step"):
        assert s[name]["status"] == "cpu-smoke", (name, s[name])
        assert "no CUDA" in s[name]["reason"]
    k = s["kernels"]["results"]
    assert k["interpreter"] and all(r["ok"] for r in k["checks"])
    assert {"fused_logprobs", "segmented_gae", "policy_loss"} == {r["op"] for r in k["checks"]}
    assert {"logprobs_fwd", "logprobs_bwd", "gae_scan", "policy_loss_fwd"} <= set(k["triton_launches"])
    assert str(k["bandwidth"]).startswith("skipped")
    m = s["megatron"]["results"]
    assert m["layer_spec"] == "local" and m["logprob_vs_hf"]["max_abs_err"] < 1e-4 and m["train_step_s"] > 0
    assert s["rl_step"]["results"]["steps"] and "loss" in s["rl_step"]["results"]["steps"][0]
    for text in ("| kernels | cpu-smoke", "| bench | skipped", "## Kernels vs references", "## megatron"):
        assert text in md
