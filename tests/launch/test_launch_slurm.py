"""`sbatch launch/scpo_4b.slurm` on a real single-node SLURM, CPU mode, tiny config, real `scpo train`.

(1) a bad config fails the job at the plan check (exit 2, before srun); (2) a job completes: one node
supervisor, torchrun starts 2 ranks, metrics + checkpoints land in the run dir; (3) USR1 (what
`--signal=B:USR1@180` sends before the time limit) stops the trainer, the job requeues itself and the next
attempt resumes from the newest complete checkpoint: the step counter continues; (4) on 2 emulated nodes
each node runs its own supervisor and torchrun node rank.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from launch_slurm_cluster import SlurmCluster, free_ports

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "scpo_4b.slurm"

# configs/tiny_cpu.yaml shrunk to seconds: RL only (GRPO), 2 prompts x 2 samples, 16 new tokens.
TINY = [
    "warmstart.enabled=false", "stage1.enabled=false", "eval.enabled=false", "compare.methods=[]",
    "algo.method=grpo", "rl.prompts_per_step=2", "rl.micro_batch_size=4", "rl.mini_batches=1",
    "rollout.n_samples=2", "rollout.max_new_tokens=16", "logging.tensorboard=false", "logging.progress=false",
    "tiny_model.hidden_size=64", "tiny_model.intermediate_size=128", "tiny_model.num_attention_heads=1",
]  # fmt: skip

pytestmark = [pytest.mark.slow]


def submit(cluster: SlurmCluster, tmp_path: Path, *overrides: str, nodes: int = 1, procs: int = 2) -> int:
    env = {"SCPO_CPU": "1", "SCPO_CONFIG": "configs/tiny_cpu.yaml", "SCPO_RUN_DIR": str(tmp_path / "run"),
           "SCPO_HOME": str(REPO), "SCPO_PYTHON": sys.executable, "SCPO_MASTER_PORT": str(free_ports(1)[0]),
           "SCPO_GPUS_PER_NODE": str(procs), "OMP_NUM_THREADS": "1", "SCPO_STOP_GRACE": "20"}  # fmt: skip
    # the script asks for 2 nodes x 8 GPUs: the command line shrinks it to this GPU-less test cluster
    return cluster.sbatch(SCRIPT, *overrides, env=env, cwd=REPO, sbatch_args=(
        f"--nodes={nodes}", "--gpus-per-node=0", "--time=15", "--job-name=scpo-test",
        f"--output={tmp_path}/slurm-%j.out"))  # fmt: skip


def job_output(tmp_path: Path, job: int) -> str:
    f = tmp_path / f"slurm-{job}.out"
    return f.read_text(errors="replace") if f.exists() else "<no job output>"


def rl_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("stage") == "rl/grpo"]


def test_slurm_bad_config_fails_at_plan_check(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = submit(slurm_cluster, tmp_path, "parallel.tp=4")  # 4 > 2 CPU ranks per node
    info = slurm_cluster.wait_job(job, timeout=60)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    assert "parallel.tp=4 > 2 procs per node" in out and "nothing was started" in out
    assert not list((tmp_path / "run" / "logs").glob("*/node-*.log"))  # no srun step ran


def test_slurm_job_completes_with_metrics_and_checkpoint(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = submit(slurm_cluster, tmp_path, *TINY, "rl.steps=2", "checkpoint.interval=1")
    info = slurm_cluster.wait_job(job, timeout=400)
    out = job_output(tmp_path, job)
    run = tmp_path / "run"
    logs = run / "logs" / f"job-{job}-r0"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out + slurm_cluster.logs()
    assert "training finished" in out and "job exit code 0" in out
    # one node supervisor (srun task) with its own log; torchrun started exactly world_size=2 ranks
    assert [p.name for p in logs.glob("node-*.log")] == ["node-localhost.log"]
    rank_dirs = sorted(p.name for p in logs.glob("ranks/localhost/*/attempt_0/*") if p.is_dir())
    assert rank_dirs == ["0", "1"]
    plan = json.loads((logs / "plan.json").read_text())
    assert (plan["world_size"], plan["dp"], plan["cpu"]) == (2, 2, True)
    # the run dir holds the metrics of both steps and a complete checkpoint behind `latest`
    assert rl_steps(run) == [1, 2]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest).is_dir() and not latest.endswith(".tmp")
    assert (run / "checkpoints" / "step_000001").is_dir()


def test_slurm_usr1_requeues_and_resumes_from_checkpoint(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    steps = 10
    job = submit(slurm_cluster, tmp_path, *TINY, f"rl.steps={steps}", "checkpoint.interval=2", "checkpoint.keep=5")
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 400
    while not list(ckpts.glob("step_*[0-9]")):  # the first complete step checkpoint, mid-run
        info = slurm_cluster.job_info(job)
        assert info.get("JobState") in ("PENDING", "RUNNING"), job_output(tmp_path, job)
        assert time.monotonic() < deadline, job_output(tmp_path, job)
        time.sleep(0.2)
    # exactly what `#SBATCH --signal=B:USR1@180` delivers before the time limit
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm_cluster.wait_job(job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=500)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out + slurm_cluster.logs()
    assert "USR1" in out and f"requeueing job {job}" in out  # --open-mode=append keeps both attempts
    assert "resuming: newest complete checkpoint is step_" in out
    # the second attempt's trainer resumed inside the RL phase from a mid-run step checkpoint
    trainer_log = (tmp_path / "run" / "logs" / f"job-{job}-r1" / "localhost" / "trainer.log").read_text()
    m = re.search(r"\[resume\] step_(\d+):.*rl_step=(\d+)", trainer_log)
    assert m, trainer_log[-3000:]
    assert 2 <= int(m.group(2)) < steps
    # the step counter continued: every RL step logged exactly once, in order, across both attempts
    assert rl_steps(tmp_path / "run") == list(range(1, steps + 1))
    assert (ckpts / "latest").read_text().strip() == "rl_grpo"


def test_slurm_two_node_job_runs_one_supervisor_and_one_node_rank_per_node(
    slurm_cluster_2nodes: SlurmCluster, tmp_path: Path
) -> None:
    """2 emulated nodes x 1 CPU rank: node discovery (scontrol hostnames + NodeAddr), node ranks, gloo DP=2."""
    cluster = slurm_cluster_2nodes
    job = submit(cluster, tmp_path, *TINY, "rl.steps=1", "checkpoint.interval=1", nodes=2, procs=1)
    info = cluster.wait_job(job, timeout=400)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out + cluster.logs()
    logs = tmp_path / "run" / "logs" / f"job-{job}-r0"
    plan = json.loads((logs / "plan.json").read_text())
    assert [n["name"] for n in plan["node_plans"]] == ["node1", "node2"]
    assert plan["master_addr"] == "127.0.0.1" and (plan["world_size"], plan["dp"]) == (2, 2)
    for i, name in enumerate(("node1", "node2")):
        node_log = (logs / f"node-{name}.log").read_text()  # this node's supervisor ran there, by SLURM name
        assert f"--nnodes=2 --nproc-per-node=1 --node-rank={i}" in node_log and "node done" in node_log
        assert [p.name for p in logs.glob(f"ranks/{name}/*/attempt_0/*")] == ["0"]
    assert rl_steps(tmp_path / "run") == [1]
