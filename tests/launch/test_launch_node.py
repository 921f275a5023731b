"""launch/node.sh, the per-node supervisor: health gate, fail-fast, clean stop. Stub processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_slurm_cluster import free_ports

from megatron_scpo.launch_plan import LaunchPlan, NodePlan, Process

NODE_SH = Path(__file__).resolve().parents[2] / "launch" / "node.sh"

STUB = r'''
import http.server, os, sys, threading, time, urllib.request
mode, pidfile = sys.argv[1], sys.argv[2]
open(pidfile, "w").write(str(os.getpid()))
if mode == "service":
    port, status, die_after, main_pidfile = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status); self.end_headers()
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("serving", port, flush=True)
    if die_after > 0:  # crash while the main runs
        while not os.path.exists(main_pidfile):
            time.sleep(0.05)
        time.sleep(die_after); print("crash", flush=True); sys.exit(1)
    while True:
        time.sleep(1)
else:
    url, sleep, rc = sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    if url != "-":
        urllib.request.urlopen(url, timeout=5)  # the service must already be healthy when a main starts
    time.sleep(sleep)
    print("main exits", rc, flush=True)
    sys.exit(rc)
'''


def alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (ProcessLookupError, FileNotFoundError, ValueError):
        return False


class Node:
    """One node plan with a stub service (HTTP /health) and a stub main, run through node.sh."""

    def __init__(self, tmp: Path, *, status: int = 200, die_after: float = 0, main_sleep: float = 0.5,
                 main_rc: int = 0) -> None:  # fmt: skip
        self.tmp = tmp
        stub = tmp / "stub.py"
        stub.write_text(STUB)
        port = free_ports(1)[0]
        url = f"http://127.0.0.1:{port}/health"
        self.svc_pid, self.main_pid = tmp / "svc.pid", tmp / "main.pid"
        py = sys.executable
        procs = [
            Process("svc", "service", [py, str(stub), "service", str(self.svc_pid), str(port), str(status),
                                       str(die_after), str(self.main_pid)], health_url=url),
            Process("trainer", "main", [py, str(stub), "main", str(self.main_pid), url, str(main_sleep),
                                        str(main_rc)], env={"SCPO_TEST_VAR": "1"}),
        ]  # fmt: skip
        node = NodePlan(index=0, name="n0", address="127.0.0.1", role="train+rollout", group="train", ranks=[0],
                        processes=procs)  # fmt: skip
        plan = LaunchPlan(config="c.yaml", overrides=[], run_dir=str(tmp), nodes=1, gpus_per_node=1, train_nodes=1,
                          rollout_nodes=0, colocate=True, cpu=True, tp=1, pp=1, dp=1, world_size=1,
                          master_addr="127.0.0.1", master_port=1, engine="sglang", router_url=None,
                          sglang_servers=[url], notes=[], node_plans=[node])  # fmt: skip
        self.logs = tmp / "logs"
        self.logs.mkdir()
        (tmp / "plan.json").write_text(plan.to_json())

    def start(self, health_timeout: int = 60, compat_wait: bool = False) -> subprocess.Popen:
        env = {**os.environ, "SCPO_PLAN": str(self.tmp / "plan.json"), "SCPO_LOG_DIR": str(self.logs),
               "SCPO_NODE": "n0", "SCPO_PYTHON": sys.executable, "SCPO_CPU": "1", "SCPO_NODE_GRACE": "5",
               "SCPO_HEALTH_TIMEOUT": str(health_timeout), "SCPO_WAIT_COMPAT": "1" if compat_wait else "0"}  # fmt: skip
        return subprocess.Popen(["bash", str(NODE_SH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip

    def run(self, **kw: int | bool) -> tuple[int, str]:
        p = self.start(**kw)
        try:
            out, _ = p.communicate(timeout=90)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        return p.returncode, out


def test_node_starts_main_after_health_and_stops_services_when_done(tmp_path: Path) -> None:
    node = Node(tmp_path)
    rc, out = node.run()
    assert rc == 0, out
    assert "healthy after" in out and "trainer finished" in out and "node done" in out
    # start order: service, health gate, then the main (the stub main fails if /health isn't up yet)
    assert out.index("start service svc") < out.index("healthy after") < out.index("start main trainer")
    assert not alive(node.svc_pid) and node.main_pid.exists()
    assert "main exits 0" in (node.logs / "n0" / "trainer.log").read_text()
    assert "serving" in (node.logs / "n0" / "svc.log").read_text()
    assert "node done" in (node.logs / "node-n0.log").read_text()
    assert "env SCPO_TEST_VAR=1" in out  # the exact command line is logged


@pytest.mark.parametrize("compat_wait", [False, True], ids=["wait-n-p", "bash<5.1"])
def test_node_fails_with_the_trainer_exit_code_and_stops_services(tmp_path: Path, compat_wait: bool) -> None:
    node = Node(tmp_path, main_rc=3)
    rc, out = node.run(compat_wait=compat_wait)
    assert rc == 3, out
    assert "ERROR: trainer exited with code 3" in out and "main exits 3" in out  # log tail shown
    assert not alive(node.svc_pid)


@pytest.mark.parametrize("compat_wait", [False, True], ids=["wait-n-p", "bash<5.1"])
def test_node_fails_fast_when_a_service_dies_mid_run(tmp_path: Path, compat_wait: bool) -> None:
    node = Node(tmp_path, die_after=0.5, main_sleep=120)
    rc, out = node.run(compat_wait=compat_wait)
    assert rc == 1, out
    assert "ERROR: service svc exited (code 1) while the job runs" in out and "crash" in out
    assert not alive(node.main_pid)  # the long-running main was stopped, not waited for


def test_node_gives_up_when_a_service_never_becomes_healthy(tmp_path: Path) -> None:
    node = Node(tmp_path, status=503)
    rc, out = node.run(health_timeout=2)
    assert rc == 1, out
    assert "not healthy after 2s" in out
    assert not node.main_pid.exists() and not alive(node.svc_pid)


def test_node_stops_children_on_sigterm(tmp_path: Path) -> None:
    node = Node(tmp_path, main_sleep=120)
    p = node.start()
    try:
        deadline = time.monotonic() + 60
        while not node.main_pid.exists():
            assert time.monotonic() < deadline and p.poll() is None, p.stdout.read() if p.stdout else ""
            time.sleep(0.1)
        os.kill(p.pid, signal.SIGTERM)  # what srun forwards when the batch script stops the step
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143, out
    assert "stop requested" in out
    assert not alive(node.main_pid) and not alive(node.svc_pid)


def test_node_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    node = Node(tmp_path)
    env = {**os.environ, "SCPO_PLAN": str(tmp_path / "plan.json"), "SCPO_LOG_DIR": str(node.logs),
           "SCPO_NODE": "missing", "SCPO_PYTHON": sys.executable}  # fmt: skip
    res = subprocess.run(["bash", str(NODE_SH)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "node 'missing' is not in the plan" in res.stdout + res.stderr
