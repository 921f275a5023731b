"""The launch plan: what the 4B SLURM script runs on 2 nodes, rank layout vs Megatron, and bad allocations.

Fast: no SLURM daemons (the scripts run in SCPO_DRY_RUN mode or stop at the plan check), no model.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import subprocess
import threading
from pathlib import Path

import pytest

from megatron_scpo import cli
from megatron_scpo.configlib import ConfigError
from megatron_scpo.launch_plan import (
    LaunchPlan,
    LaunchPlanError,
    emit_node_lines,
    make_plan,
    rank_coords,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def write_config(path: Path, **sections: dict) -> Path:
    import yaml

    base = {"name": "q4b", "model": {"hf_path": "/models/qwen3-4b", "dtype": "bfloat16"},
            "parallel": {"tp": 2, "pp": 1}, "rollout": {"engine": "sglang"}}  # fmt: skip
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(base))
    return path


def run_script(script: str, env: dict[str, str], *args: str, path_prefix: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCPO_"))}
    full.update(env)
    if path_prefix:
        full["PATH"] = f"{path_prefix}:{full['PATH']}"
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def script_plan(tmp_path: Path, script: str, config: Path, hosts: str, **env: str) -> tuple[LaunchPlan, str]:
    """Run a .slurm script in SCPO_DRY_RUN mode as SLURM would (job id, node list) and load its plan."""
    run_dir = tmp_path / "run"
    res = run_script(script, {"SCPO_DRY_RUN": "1", "SCPO_CONFIG": str(config), "SCPO_RUN_DIR": str(run_dir),
                              "SCPO_HOSTNAMES": hosts, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "scpo-4b",
                              "SCPO_GPUS_PER_NODE": "8", **env})  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    plan_path = run_dir / "logs" / "job-4242-r0" / "plan.json"
    return LaunchPlan.from_json(plan_path.read_text()), res.stdout


# ------------------------------------------------------------------------------------------ the 4B plan
def test_4b_script_plan_two_nodes_disaggregated(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "q4b.yaml")
    plan, text = script_plan(tmp_path, "scpo_4b.slurm", cfg, "gpu-a,gpu-b")
    # sizes: 1 training node x 8 GPUs, TP=2 -> DP=4; the script's default is 1 rollout node
    assert (plan.nodes, plan.train_nodes, plan.rollout_nodes) == (2, 1, 1)
    assert (plan.tp, plan.pp, plan.dp, plan.world_size) == (2, 1, 4, 8)
    assert plan.master_addr == "gpu-a" and plan.master_port == 20000 + 4242  # job-id derived port
    a, b = plan.node_plans
    assert (a.name, a.role, a.group, a.ranks) == ("gpu-a", "train", "train", list(range(8)))
    assert (b.name, b.role, b.group, b.ranks) == ("gpu-b", "rollout", "rollout", [])
    # rollout node: 8 single-GPU servers on ports 30010..30080 (NCCL port +1), router on 30000
    servers = [p for p in b.processes if p.name.startswith("sglang-")]
    assert len(servers) == 8
    for i, p in enumerate(servers):  # the nodes' interpreter (no rollout.sglang.python), SGLang's defaults
        assert p.argv == ["python3", "-m", "sglang.launch_server", "--model-path", "/models/qwen3-4b", "--host", "gpu-b",
                          "--port", str(30010 + 10 * i), "--tp-size", "1", "--base-gpu-id", str(i), "--dtype", "auto",
                          "--mem-fraction-static", "0.85", "--nccl-port", str(30011 + 10 * i)]  # fmt: skip
        assert p.kind == "service" and p.health_url == f"http://gpu-b:{30010 + 10 * i}/health"
    (router,) = [p for p in b.processes if p.name == "router"]
    assert router.argv[1:3] == ["-m", "sglang_router.launch_router"]
    assert router.argv[router.argv.index("--port") + 1] == "30000"
    assert router.argv[router.argv.index("--worker-urls") + 1 :] == [f"http://gpu-b:{30010 + 10 * i}" for i in range(8)]
    # training node: waits for the router, then torchrun with the job's ranks
    assert a.wait_for == ["http://gpu-b:30000/health"]
    (trainer,) = a.processes
    argv = trainer.argv
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=1", "--nproc-per-node=8", "--node-rank=0", "--master-addr=gpu-a", "--master-port=24242",
                 "--max-restarts=0"):  # fmt: skip
        assert flag in argv
    tail = argv[argv.index("megatron_scpo.cli") + 1 :]
    assert tail[:2] == ["train", str(cfg)] and tail[-2:] == ["--run-dir", str(tmp_path / "run")]
    overrides = dict(o.split("=", 1) for o in tail[2:-2])
    assert overrides["rollout.engine"] == "sglang"
    assert json.loads(overrides["rollout.sglang_urls"]) == [f"http://gpu-b:{30010 + 10 * i}" for i in range(8)]
    assert overrides["rollout.sglang.router_url"] == "http://gpu-b:30000"
    # servers live on another node than rank 0: weight sync needs the NCCL group at gpu-a:master_port+1
    assert overrides["rollout.sglang.weight_sync"] == "distributed"
    assert overrides["rollout.sglang.sync_master_addr"] == "gpu-a"
    assert overrides["rollout.sglang.sync_master_port"] == "24243"
    # the printed plan is what the job log shows
    assert "training: 1 node(s), world=8 TP=2 PP=1 DP=4, master=gpu-a:24242" in text
    assert "node 1 gpu-b (gpu-b) role=rollout" in text
    env = (tmp_path / "run" / "logs" / "job-4242-r0" / "plan.env").read_text()
    assert "SCPO_PLAN_TRAIN_HOSTS=gpu-a\n" in env and "SCPO_PLAN_ROLLOUT_HOSTS=gpu-b\n" in env


def test_4b_script_two_training_nodes_pp2_and_node_commands(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "q4b.yaml", parallel={"tp": 2, "pp": 2}, rollout={"engine": "local"})
    plan, _ = script_plan(tmp_path, "scpo_4b.slurm", cfg, "n1,n2", SCPO_ROLLOUT_NODES="0",
                          SCPO_ADDRESSES="n1.ib,n2.ib", SCPO_MASTER_PORT="29999")  # fmt: skip
    assert (plan.train_nodes, plan.world_size, plan.tp, plan.pp, plan.dp) == (2, 16, 2, 2, 4)
    assert plan.sglang_servers == [] and plan.engine == "local"
    n1, n2 = plan.node_plans
    assert n1.ranks == list(range(8)) and n2.ranks == list(range(8, 16))
    for n in (n1, n2):
        argv = n.processes[0].argv
        assert f"--node-rank={n.index}" in argv and "--nnodes=2" in argv
        assert "--master-addr=n1.ib" in argv and "--master-port=29999" in argv  # NodeAddr, not the name
    # pp is the slowest dimension: node 1 holds stage 0, node 2 stage 1 (hand-computed: pp = rank // (tp*dp))
    assert {rank_coords(r, 2, 2, 4)[1] for r in n1.ranks} == {0}
    assert {rank_coords(r, 2, 2, 4)[1] for r in n2.ranks} == {1}
    # what node.sh on n2 reads: one main line, no waits
    lines = emit_node_lines(plan, "n2")
    assert len(lines) == 1
    kind, name, health, cmd = lines[0].split("\t")
    assert (kind, name, health) == ("main", "trainer", "-")
    assert shlex.split(cmd) == n2.processes[0].argv


def test_1p5b_script_colocates_servers_with_trainer(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "r1.yaml", parallel={"tp": 1, "pp": 1})
    plan, _ = script_plan(tmp_path, "scpo_1p5b.slurm", cfg, "g1")
    (node,) = plan.node_plans
    assert node.role == "train+rollout" and plan.dp == 8
    names = [p.name for p in node.processes]
    assert names == [f"sglang-{i}" for i in range(8)] + ["router", "trainer"]
    server = node.processes[0].argv
    assert server[server.index("--mem-fraction-static") + 1] == "0.4" and server[-1] == "--enable-memory-saver"
    assert node.wait_for == ["http://g1:30000/health"]
    # same node as rank 0: the configured tensor sync stays
    trainer = node.processes[-1].argv
    assert not any(a.startswith("rollout.sglang.weight_sync=") for a in trainer)
    lines = emit_node_lines(plan, "g1")
    assert lines[0] == "wait\thttp://g1:30000/health"
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["service"] * 9 + ["main"]


def test_rank_coords_match_megatron_rank_generator() -> None:
    from megatron.core.parallel_state import RankGenerator

    for tp, pp, dp in [(2, 2, 4), (1, 4, 2), (4, 1, 2), (8, 2, 1)]:
        gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        for axis, idx in (("tp", 0), ("pp", 1), ("dp", 2)):
            for group in gen.get_ranks(axis):
                coords = [rank_coords(r, tp, pp, dp) for r in group]
                # members of one group differ only along that axis, which runs 0..size-1
                assert [c[idx] for c in coords] == list(range(len(group)))
                others = {tuple(v for j, v in enumerate(c) if j != idx) for c in coords}
                assert len(others) == 1


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, overrides, match",
    [
        ({"nodes": 1, "gpus_per_node": 8}, ["parallel.tp=16"], r"parallel\.tp=16 > 8 GPUs per node"),
        ({"nodes": 1, "gpus_per_node": 6}, ["parallel.tp=4"], r"parallel\.tp=4 does not divide 6 GPUs per node"),
        ({"nodes": 3, "gpus_per_node": 8, "rollout_nodes": 1}, ["parallel.tp=4", "parallel.pp=3"],
         r"tp\*parallel\.pp = 4\*3 = 12 does not divide the 16 training GPUs"),
        ({"nodes": 2, "gpus_per_node": 8, "rollout_nodes": 2}, [], r"--rollout-nodes=2 leaves no training node"),
        ({"nodes": 2, "gpus_per_node": 8, "rollout_nodes": 1, "colocate": True}, [], "exclusive"),
        ({"nodes": 1, "gpus_per_node": 8}, [], r"rollout\.engine=sglang but no servers"),
        ({"nodes": 2, "gpus_per_node": 8, "rollout_nodes": 1}, ["rollout.sglang.tp_size=3"],
         r"rollout\.sglang\.tp_size=3 does not divide 8"),
        ({"nodes": 2, "gpus_per_node": 8, "rollout_nodes": 1}, ['rollout.sglang_urls=["http://x:1"]'],
         r"rollout\.sglang_urls points at external servers"),
        ({"nodes": 2, "gpus_per_node": 8, "rollout_nodes": 1}, ["model.hf_path=null"], r"need model\.hf_path"),
        ({"nodes": 1, "gpus_per_node": 2, "cpu": True}, [], r"CPU mode needs rollout\.engine=local"),
        ({"nodes": 1, "gpus_per_node": 2, "cpu": True, "colocate": True}, [], "CPU mode"),
        ({"nodes": 2, "gpus_per_node": 8, "hostnames": ["a"]}, [], r"1 hostnames given \(a\) for --nodes=2"),
        ({"nodes": 0, "gpus_per_node": 8}, [], r"--nodes must be >= 1"),
        ({"nodes": 1, "gpus_per_node": 8, "colocate": True, "master_port": 30020}, [], "collides with SGLang ports"),
        ({"nodes": 1, "gpus_per_node": 8, "colocate": True, "master_port": 29999}, [], "collides"),  # +1 = router
        ({"nodes": 1, "gpus_per_node": 8, "master_port": 70000}, [], r"--master-port=70000 is not a port"),
        ({"nodes": 1, "gpus_per_node": 8}, ["parallel.tp=0"], r"c\.yaml with override parallel\.tp=0: parallel: tp.* must be >= 1"),
    ],
)
def test_bad_allocation_is_one_clear_error(tmp_path: Path, kwargs: dict, overrides: list[str], match: str) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    # config errors (ConfigError) come from the config loader; LaunchPlanError is one of them
    with pytest.raises(LaunchPlanError if "parallel:" not in match else ConfigError, match=match):
        make_plan(str(cfg), overrides=overrides, **kwargs)


def test_slurm_script_rejects_bad_fit_before_starting_anything(tmp_path: Path) -> None:
    """tp > GPUs per node: the batch script exits 2 with the reason and never calls srun."""
    cfg = write_config(tmp_path / "c.yaml", parallel={"tp": 16})
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "srun_called"
    for tool, body in (("srun", f"echo srun \"$@\" >> {marker}"), ("scontrol", "exit 0")):
        (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
        (fake / tool).chmod(0o755)
    res = run_script("scpo_4b.slurm", {"SCPO_CONFIG": str(cfg), "SCPO_RUN_DIR": str(tmp_path / "run"),
                                       "SCPO_HOSTNAMES": "a,b", "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2",
                                       "SLURM_GPUS_ON_NODE": "8"}, path_prefix=str(fake))  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "parallel.tp=16 > 8 GPUs per node" in res.stderr
    assert "nothing was started" in res.stderr
    assert not marker.exists()


def test_slurm_script_missing_config_and_node_count_mismatch(tmp_path: Path) -> None:
    res = run_script("scpo_4b.slurm", {"SCPO_CONFIG": str(tmp_path / "nope.yaml"), "SCPO_HOSTNAMES": "a,b",
                                       "SCPO_RUN_DIR": str(tmp_path / "run")})  # fmt: skip
    assert res.returncode == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in res.stderr
    cfg = write_config(tmp_path / "c.yaml")
    res = run_script("scpo_4b.slurm", {"SCPO_CONFIG": str(cfg), "SCPO_HOSTNAMES": "a,b", "SLURM_JOB_NUM_NODES": "3",
                                       "SCPO_GPUS_PER_NODE": "8", "SCPO_RUN_DIR": str(tmp_path / "run")})  # fmt: skip
    assert res.returncode == 2 and "SLURM_JOB_NUM_NODES=3 but node list has 2" in res.stderr


# ------------------------------------------------------------------------------------------ CLI + helpers
def test_scpo_launch_dry_run_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    rc = cli.main(["launch", "--dry-run", str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--rollout-nodes", "1",
                   "--hostnames", "h0,h1", "rl.steps=3", "--json"])  # fmt: skip
    assert rc == 0
    plan = LaunchPlan.from_json(capsys.readouterr().out)
    assert plan.overrides == ["rl.steps=3"] and plan.dp == 4
    assert LaunchPlan.from_json(plan.to_json()) == plan
    trainer = plan.node("h0").processes[0].argv
    assert "rl.steps=3" in trainer
    rc = cli.main(["launch", "--dry-run", str(cfg), "--nodes", "1", "--gpus-per-node", "8", "--colocate",
                   "parallel.pp=3"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "parallel.tp*parallel.pp = 2*3 = 6 does not divide the 8 training GPUs" in err
    with pytest.raises(LaunchPlanError, match="node 'zz' is not in the plan"):
        plan.node("zz")


def test_plan_servers_use_the_engines_launch_command(tmp_path: Path) -> None:
    """One command line for an SGLang server: the plan's (its host/port/GPU slice, fixed NCCL port, colocated
    memory settings) is ``build_launch_command``'s, the one the engine's launch mode runs."""
    from megatron_scpo.rollout.sglang import build_launch_command

    cfg = write_config(tmp_path / "c.yaml", rollout={"sglang": {
        "tp_size": 2, "dtype": "bfloat16", "context_length": 4096, "extra_args": ["--disable-radix-cache"],
        "base_port": 31000, "launcher": ["apptainer", "exec", "x.sif"]}})  # fmt: skip
    plan = make_plan(str(cfg), nodes=1, gpus_per_node=4, colocate=True, python="py", hostnames=["h"])
    servers = [p for p in plan.node_plans[0].processes if p.name.startswith("sglang-")]
    assert [p.argv for p in servers] == [
        ["py", "-m", "sglang.launch_server", "--model-path", "/models/qwen3-4b", "--host", "h", "--port", str(port),
         "--tp-size", "2", "--base-gpu-id", str(gpu), "--dtype", "bfloat16", "--mem-fraction-static", "0.4",
         "--context-length", "4096", "--nccl-port", str(port + 1), "--disable-radix-cache", "--enable-memory-saver"]
        for port, gpu in ((31010, 0), (31020, 2))
    ]  # fmt: skip  (the launcher prefix is the engine's launch mode only)
    from megatron_scpo.config import load_config

    sg = load_config(str(cfg)).rollout.sglang
    engine_cmd = build_launch_command(sg, 1, "/models/qwen3-4b", python="py")
    assert engine_cmd[:3] == ["apptainer", "exec", "x.sif"] and engine_cmd[3:] == [
        "py", "-m", "sglang.launch_server", "--model-path", "/models/qwen3-4b", "--host", "127.0.0.1", "--port",
        "31001", "--tp-size", "2", "--base-gpu-id", "2", "--dtype", "bfloat16", "--context-length", "4096",
        "--disable-radix-cache"]  # fmt: skip


def test_wait_healthy_reports_only_the_dead_endpoint() -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert wait_healthy([f"{base}/health"], timeout=5) == []
        down = wait_healthy([f"{base}/health", f"{base}/other"], timeout=0.5, interval=0.1)
        assert down == [f"{base}/other"]
    finally:
        srv.shutdown()
