"""A real single-node SLURM cluster (munged + slurmctld + slurmd) for tests, everything under one directory.

Loopback only (NoInAddrAny / NoCtldInAddrAny, NodeAddr=127.0.0.1), free ports picked at start, no cgroups
(proctrack/linuxproc + task/none), its own munge key and socket: nothing outside ``root`` is touched, so
it can run next to any other SLURM on the machine. ``stop()`` tears everything down by pid.
cred_expire=10 (default 120) also shortens how long Slurm holds a requeued job before it may start again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "munged")


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / name).is_file()), None
    )


def slurm_available() -> bool:
    return all(find_binary(b) for b in SLURM_BINARIES)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1024, int(line.split()[1]) // 1024 - 1024)
    return 4096


class SlurmCluster:
    """``nodes=1``: one node called ``localhost``. ``nodes>1``: emulated nodes ``node1..N``, each its own
    slurmd on this host (own port, spool, log), all with NodeAddr 127.0.0.1. Partition ``debug``."""

    def __init__(self, root: Path, cpus: int | None = None, nodes: int = 1) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 2
        self.node_names = ["localhost"] if nodes == 1 else [f"node{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self._munged_pid: int | None = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        for d in ("state", "spool", "run", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        munged = find_binary("munged")
        subprocess.run(
            [munged, "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'seed'}"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        self._munged_pid = int((self.root / "munge" / "munged.pid").read_text())
        ctld_port, *d_ports = free_ports(1 + len(self.node_names))
        r = self.root
        mem = _mem_mb() // len(self.node_names)
        host = socket.gethostname()
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
            + ("" if n == "localhost" else f" NodeHostname={host}")
            for n, p in zip(self.node_names, d_ports)
        )
        for n in self.node_names:
            (r / "spool" / n).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""ClusterName=scpotest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort={ctld_port}
SlurmdPort={d_ports[0]}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        subprocess.run([find_binary("slurmctld")], env=self.env, check=True, capture_output=True, timeout=30)
        for n in self.node_names:
            subprocess.run([find_binary("slurmd"), "-N", n], env=self.env, check=True, capture_output=True,
                           timeout=30)  # fmt: skip
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(state) == len(self.node_names) and all(s in ("idle", "mixed", "allocated") for s in state):
                return
            time.sleep(0.2)
        raise RuntimeError(f"slurm node not idle after {timeout}s (state {state!r}); logs:\n{self.logs()}")

    def stop(self) -> None:
        """scancel everything, shut the daemons down, stop munged; by pid, never by name."""
        if self.conf.exists():
            self.run("scancel", "--full", "--user=root", check=False)
            self.run("scontrol", "shutdown", check=False)
        for n in self.node_names:
            self._wait_or_kill(self.root / "run" / f"slurmd-{n}.pid")
        self._wait_or_kill(self.root / "run" / "slurmctld.pid")
        if self._munged_pid:
            self._kill_pid(self._munged_pid)
            self._munged_pid = None

    def _wait_or_kill(self, pidfile: Path, timeout: float = 10.0) -> None:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        self._kill_pid(pid, timeout, first=None)

    @staticmethod
    def _kill_pid(pid: int, timeout: float = 10.0, first: signal.Signals | None = signal.SIGTERM) -> None:
        try:
            if first is not None:
                os.kill(pid, first)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ commands
    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, check=check, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    def sbatch(self, script: str | Path, *args: str, sbatch_args: tuple[str, ...] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:  # fmt: skip
        out = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args], env={**self.env, **(env or {})},
            cwd=cwd, check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return int(out.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        info = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, job_id: int, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                 "NODE_FAIL", "OUT_OF_MEMORY"), timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:  # fmt: skip
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"----- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)
