"""The batch-level supervisor of launch/*.slurm (scpo_job_main) with a fake `srun`: fail fast, timeouts.

The fake srun stands in for one step per node group; its behaviour per group comes from the environment
(FAKE_SRUN_<host>=exit:N | sleep:S), and it records that it ran and whether it was stopped.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun: find --nodelist=HOST, act as FAKE_SRUN_<HOST> says
host=""
for a in "$@"; do case "$a" in --nodelist=*) host="${a#--nodelist=}" ;; esac; done
spec_var="FAKE_SRUN_${host//[^A-Za-z0-9]/_}"
spec="${!spec_var:-exit:0}"
echo "$host started" >> "$FAKE_LOG"
child=""
trap 'echo "$host stopped" >> "$FAKE_LOG"; [ -n "$child" ] && kill "$child"; exit 143' TERM
case "$spec" in
    exit:*) exit "${spec#exit:}" ;;
    sleep:*) sleep "${spec#sleep:}" </dev/null >/dev/null 2>&1 & child=$!; wait "$child" ;;
esac
"""


@pytest.fixture()
def job(tmp_path: Path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hf_path": "/models/m"}, "parallel": {"tp": 2},
                                   "rollout": {"engine": "sglang"}}))  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    log = tmp_path / "fake.log"

    def run(timeout: float = 60, **env: str) -> tuple[int, str, str, float]:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCPO_"))}
        full.update({"PATH": f"{bin_dir}:{full['PATH']}", "SCPO_CONFIG": str(cfg), "SCPO_RUN_DIR": str(tmp_path / "run"),
                     "SCPO_HOSTNAMES": "a,b", "SCPO_ADDRESSES": "a,b", "SCPO_GPUS_PER_NODE": "8",
                     "SCPO_STALL_TIMEOUT": "0", "FAKE_LOG": str(log), **env})  # fmt: skip
        t0 = time.monotonic()
        out_file = tmp_path / "job.out"
        with out_file.open("w") as out:  # a file, not a pipe: a stray grandchild can't hold the test up
            res = subprocess.run(["bash", str(REPO / "launch" / "scpo_4b.slurm")], env=full, cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
        events = log.read_text() if log.exists() else ""
        return res.returncode, out_file.read_text(), events, time.monotonic() - t0

    return run


def test_job_succeeds_when_training_ends_and_stops_the_rollout_step(job) -> None:
    rc, out, events, _ = job(FAKE_SRUN_a="exit:0", FAKE_SRUN_b="sleep:120")
    assert rc == 0, out
    assert "training finished" in out and "job exit code 0" in out
    assert "a started" in events and "b started" in events and "b stopped" in events


def test_job_fails_with_the_training_exit_code(job) -> None:
    rc, out, events, _ = job(FAKE_SRUN_a="exit:3", FAKE_SRUN_b="sleep:120")
    assert rc == 3, out
    assert "ERROR: training step failed (rc=3)" in out and "b stopped" in events


def test_job_fails_fast_when_the_rollout_step_dies(job) -> None:
    rc, out, events, elapsed = job(FAKE_SRUN_a="sleep:120", FAKE_SRUN_b="exit:1")
    assert rc == 1, out
    assert "ERROR: rollout step exited (rc=1) while training runs" in out
    assert "a stopped" in events and elapsed < 60  # training was killed, not waited for


def test_job_timeout_and_stall_watchdog(job, tmp_path: Path) -> None:
    rc, out, events, elapsed = job(FAKE_SRUN_a="sleep:120", FAKE_SRUN_b="sleep:120", SCPO_JOB_TIMEOUT="3")
    assert rc == 124 and "SCPO_JOB_TIMEOUT=3s reached" in out, out
    assert "a stopped" in events and "b stopped" in events and elapsed < 60
    (tmp_path / "fake.log").unlink()
    rc, out, events, _ = job(FAKE_SRUN_a="sleep:120", FAKE_SRUN_b="sleep:120", SCPO_STALL_TIMEOUT="3")
    assert rc == 125 and "stall watchdog fired" in out, out
    assert "no progress in" in out and "a stopped" in events
