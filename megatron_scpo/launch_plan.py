"""The one home of the multi-node launch plan: which node runs what (`scpo launch`).

`scpo launch --dry-run CONFIG --nodes N --gpus-per-node G [--rollout-nodes K] [--colocate]` prints the exact
commands every node will run. The SLURM scripts under ``launch/`` call this same module
(``--write-plan`` in the batch script, ``--emit-node-cmd`` on every node), so a dry run shows exactly what
the job executes, and a config whose parallel sizes don't fit the allocation fails at job start, before
any model loads.

Node layout: the first ``nodes - rollout_nodes`` nodes train (torchrun, global rank = node * G + local
rank, Megatron's tp-fastest order so TP groups never straddle nodes); the last ``rollout_nodes`` nodes run
SGLang servers behind one sglang-router. ``--colocate`` runs the servers on the training nodes' GPUs
instead. ``--cpu`` is the test mode: gloo, no GPUs, the in-process rollout engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from megatron_scpo.configlib import ConfigError

if TYPE_CHECKING:
    from megatron_scpo.config import ExperimentConfig

DEFAULT_MASTER_PORT = 29500  # torch.distributed store; the weight-sync group (disaggregated) uses +1
# Ports from rollout.sglang.base_port (B): router on B, server i of a node on B + 10*(i+1), its NCCL port +1.
SGLANG_PORT_STRIDE = 10


class LaunchPlanError(ConfigError):
    """The requested allocation and the config don't fit together (raised before anything starts)."""


@dataclass
class Process:
    """One long-running process of a node.

    ``main`` processes (the trainer) end the node's work when they exit 0; ``service`` processes (SGLang
    servers, router) must stay up while any main runs, so their exit is a failure.
    """

    name: str
    kind: Literal["main", "service"]
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None

    def shell(self) -> str:
        """The command as one shell line (``env K=V ... argv``), exactly what the node runs."""
        prefix = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        return shlex.join(prefix + self.argv)


@dataclass
class NodePlan:
    index: int
    name: str
    address: str
    role: Literal["train", "rollout", "train+rollout"]
    group: Literal["train", "rollout"]  # which srun step runs this node
    ranks: list[int] = field(default_factory=list)  # global trainer ranks on this node
    wait_for: list[str] = field(default_factory=list)  # health URLs that must answer before mains start
    processes: list[Process] = field(default_factory=list)


@dataclass
class LaunchPlan:
    config: str
    overrides: list[str]
    run_dir: str
    nodes: int
    gpus_per_node: int
    train_nodes: int
    rollout_nodes: int
    colocate: bool
    cpu: bool
    tp: int
    pp: int
    dp: int
    world_size: int
    master_addr: str
    master_port: int
    engine: str
    router_url: str | None
    sglang_servers: list[str]
    notes: list[str]
    node_plans: list[NodePlan]

    # ------------------------------------------------------------------ views
    def node(self, name: str) -> NodePlan:
        for n in self.node_plans:
            if n.name == name:
                return n
        raise LaunchPlanError(f"node {name!r} is not in the plan; plan nodes: {[n.name for n in self.node_plans]}")

    def group_hosts(self, group: str) -> list[str]:
        return [n.name for n in self.node_plans if n.group == group]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LaunchPlan:
        data = json.loads(text)
        nodes = []
        for n in data.pop("node_plans"):
            procs = [Process(**p) for p in n.pop("processes")]
            nodes.append(NodePlan(**n, processes=procs))
        return cls(**data, node_plans=nodes)

    def shell_env(self) -> str:
        """Variables the batch script sources (node lists per srun group, sizes, router URL)."""
        values = {
            "SCPO_PLAN_TRAIN_HOSTS": ",".join(self.group_hosts("train")),
            "SCPO_PLAN_ROLLOUT_HOSTS": ",".join(self.group_hosts("rollout")),
            "SCPO_PLAN_TRAIN_NODES": str(len(self.group_hosts("train"))),
            "SCPO_PLAN_ROLLOUT_NODES": str(len(self.group_hosts("rollout"))),
            "SCPO_PLAN_WORLD_SIZE": str(self.world_size),
            "SCPO_PLAN_ROUTER_URL": self.router_url or "",
        }
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())

    def format_text(self) -> str:
        unit = "procs" if self.cpu else "GPUs"
        lines = [
            f"plan: config={self.config} run_dir={self.run_dir}",
            f"  allocation: {self.nodes} node(s) x {self.gpus_per_node} {unit}"
            + (" [CPU mode: gloo, no GPUs]" if self.cpu else ""),
            f"  training: {self.train_nodes} node(s), world={self.world_size} TP={self.tp} PP={self.pp} "
            f"DP={self.dp}, master={self.master_addr}:{self.master_port}",
        ]
        if self.sglang_servers:
            mode = "colocated on the training GPUs" if self.colocate else f"{self.rollout_nodes} rollout node(s)"
            lines.append(f"  rollout: {len(self.sglang_servers)} SGLang server(s), {mode}, router {self.router_url}")
        else:
            lines.append(f"  rollout: engine={self.engine}, no servers launched by this job")
        lines += [f"  note: {n}" for n in self.notes]
        for n in self.node_plans:
            ranks = f" ranks {n.ranks[0]}-{n.ranks[-1]}" if n.ranks else ""
            lines.append(f"node {n.index} {n.name} ({n.address}) role={n.role} srun-group={n.group}{ranks}")
            if n.ranks:
                lines.append(f"  layout: {rank_layout_summary(n.ranks, self.tp, self.pp, self.dp)}")
            for url in n.wait_for:
                lines.append(f"  [wait] {url}")
            for p in n.processes:
                lines.append(f"  [{p.kind}] {p.name}: {p.shell()}")
        return "\n".join(lines)


def rank_coords(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """Megatron's default order (tp fastest, then dp, pp slowest): global rank -> (tp, pp, dp) ranks."""
    return rank % tp, rank // (tp * dp), (rank // tp) % dp


def rank_layout_summary(ranks: list[int], tp: int, pp: int, dp: int) -> str:
    """Which PP stages / DP replicas / TP groups a node holds, for eyeballing a plan."""
    coords = [rank_coords(r, tp, pp, dp) for r in ranks]
    stages = sorted({c[1] for c in coords})
    replicas = sorted({c[2] for c in coords})
    groups = [ranks[i : i + tp] for i in range(0, len(ranks), tp)]
    shown = " ".join(str(g) for g in groups[:4]) + (" ..." if len(groups) > 4 else "")
    return f"pp stages {stages}, dp replicas {replicas}, tp groups {shown}"


# ---------------------------------------------------------------------------------------- planning
def _check_sizes(nodes: int, gpus_per_node: int, rollout_nodes: int, colocate: bool, cpu: bool) -> None:
    if nodes < 1:
        raise LaunchPlanError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 1:
        raise LaunchPlanError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if rollout_nodes < 0:
        raise LaunchPlanError(f"--rollout-nodes must be >= 0, got {rollout_nodes}")
    if rollout_nodes >= nodes:
        raise LaunchPlanError(
            f"--rollout-nodes={rollout_nodes} leaves no training node out of --nodes={nodes}; "
            "use fewer rollout nodes or --colocate"
        )
    if colocate and rollout_nodes:
        raise LaunchPlanError("--colocate and --rollout-nodes are exclusive: servers either share GPUs or own nodes")
    if cpu and (colocate or rollout_nodes):
        raise LaunchPlanError("CPU mode uses the in-process rollout engine: drop --rollout-nodes / --colocate")


def check_parallel_fit(tp: int, pp: int, train_nodes: int, gpus_per_node: int, unit: str = "GPUs") -> int:
    """Megatron's layout must tile the training GPUs with TP inside a node; returns DP."""
    world = train_nodes * gpus_per_node
    if tp > gpus_per_node:
        raise LaunchPlanError(
            f"parallel.tp={tp} > {gpus_per_node} {unit} per node: tensor parallelism must stay inside one node"
        )
    if gpus_per_node % tp:
        raise LaunchPlanError(
            f"parallel.tp={tp} does not divide {gpus_per_node} {unit} per node: TP groups would straddle nodes"
        )
    if world % (tp * pp):
        raise LaunchPlanError(
            f"parallel.tp*parallel.pp = {tp}*{pp} = {tp * pp} does not divide the {world} training {unit} "
            f"({train_nodes} node(s) x {gpus_per_node})"
        )
    return world // (tp * pp)


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0] == key for o in overrides)


def _rollout_engine(cfg: ExperimentConfig, config_path: str, launch_servers: bool, cpu: bool,
                    gpus_per_node: int, notes: list[str]) -> str:  # fmt: skip
    """The engine the trainer will use, after checking that the config and the allocation agree on it."""
    engine, sg = cfg.rollout.engine, cfg.rollout.sglang
    if cpu:
        if engine != "local":
            raise LaunchPlanError(f"{config_path}: CPU mode needs rollout.engine=local, config has {engine!r}")
        return engine
    if launch_servers:
        if gpus_per_node % sg.tp_size:
            raise LaunchPlanError(f"rollout.sglang.tp_size={sg.tp_size} does not divide {gpus_per_node} GPUs per node")
        if (sg.model_path or cfg.model.hf_path) is None:
            raise LaunchPlanError(f"{config_path}: SGLang servers need model.hf_path (an HF model dir)")
        if cfg.rollout.sglang_urls:
            raise LaunchPlanError(
                f"{config_path}: rollout.sglang_urls points at external servers, but this plan launches its own "
                "(--rollout-nodes/--colocate); drop one of the two"
            )
        if engine != "sglang":
            notes.append(f"rollout.engine {engine} -> sglang (this job launches SGLang servers)")
        return "sglang"
    if engine == "sglang" and not cfg.rollout.sglang_urls:
        raise LaunchPlanError(
            f"{config_path}: rollout.engine=sglang but no servers: pass --rollout-nodes K or --colocate, "
            "or set rollout.sglang_urls"
        )
    if engine == "local":
        notes.append("rollout.engine=local: the trainer generates in-process (no SGLang servers)")
    return engine


def _add_sglang(cfg: ExperimentConfig, server_nodes: list[NodePlan], gpus_per_node: int, colocate: bool,
                python: str, notes: list[str]) -> tuple[list[str], str]:  # fmt: skip
    """Append SGLang servers (one per tp_size GPUs) to every server node and the router to the first;
    returns (server URLs, router URL).

    Each server's command line is ``rollout.sglang.build_launch_command`` (the engine's launch mode uses it too)
    of ``rollout.sglang`` with this node's host, port and GPU slice, ``mem_fraction_static`` defaulting to 0.4
    colocated / 0.85 alone, ``--enable-memory-saver`` added when colocated, a fixed NCCL port, no ``launcher``
    (launch mode only). Servers and router run ``rollout.sglang.python`` (SGLang's environment) when set, else
    the nodes' ``python``, with ``rollout.sglang.env`` added to their environment."""
    from megatron_scpo.rollout.sglang import build_launch_command

    sg = cfg.rollout.sglang
    mem = sg.mem_fraction_static if sg.mem_fraction_static is not None else (0.4 if colocate else 0.85)
    extra = list(sg.extra_args)
    if colocate and "--enable-memory-saver" not in extra:
        extra.append("--enable-memory-saver")  # lets the trainer release/resume KV cache memory
    model_path = str(sg.model_path or cfg.model.hf_path)
    urls: list[str] = []
    for n in server_nodes:
        for s in range(gpus_per_node // sg.tp_size):
            port = sg.base_port + SGLANG_PORT_STRIDE * (s + 1)
            server = dataclasses.replace(sg, host=n.address, base_port=port, base_gpu_id=s * sg.tp_size,
                                         mem_fraction_static=mem, extra_args=extra, launcher=[])
            argv = build_launch_command(server, 0, model_path, python=sg.python or python, nccl_port=port + 1)
            url = f"http://{n.address}:{port}"
            urls.append(url)
            n.processes.append(Process(f"sglang-{s}", "service", argv, env=dict(sg.env), health_url=f"{url}/health"))
    if sg.num_servers != len(urls):
        notes.append(f"{len(urls)} SGLang servers (one per {sg.tp_size} GPU(s) of each server node); "
                     f"rollout.sglang.num_servers={sg.num_servers} only applies when the engine launches its own")
    head = server_nodes[0]
    router = f"http://{head.address}:{sg.base_port}"
    head.processes.append(Process(
        "router", "service",
        [sg.python or python, "-m", "sglang_router.launch_router", "--host", head.address, "--port",
         str(sg.base_port), "--worker-urls", *urls],
        env=dict(sg.env), health_url=f"{router}/health",
    ))  # fmt: skip
    return urls, router


def _sglang_overrides(cfg: ExperimentConfig, server_nodes: list[NodePlan], urls: list[str], router: str,
                      master_addr: str, master_port: int, notes: list[str]) -> dict[str, str]:  # fmt: skip
    """Config overrides that point the trainer at this job's servers.

    Generation goes through the router; weight sync goes to every server. update_weights_from_tensor only
    reaches servers on trainer rank 0's node, so servers elsewhere need the NCCL group (on master_port+1).
    """
    sg = cfg.rollout.sglang
    planned = {"rollout.engine": "sglang", "rollout.sglang_urls": json.dumps(urls), "rollout.sglang.router_url": router}
    remote = any(n.index != 0 for n in server_nodes)
    if remote and sg.weight_sync == "tensor":
        planned["rollout.sglang.weight_sync"] = "distributed"
        notes.append("rollout.sglang.weight_sync tensor -> distributed (servers on other nodes than rank 0)")
    if remote or sg.weight_sync == "distributed":
        planned["rollout.sglang.sync_master_addr"] = master_addr
        planned["rollout.sglang.sync_master_port"] = str(master_port + 1)
    ports = {int(u.rsplit(":", 1)[1]) for n in server_nodes if n.index == 0 for u in urls if n.address in u}
    ports |= {p + 1 for p in ports} | ({cfg.rollout.sglang.base_port} if server_nodes[0].index == 0 else set())
    if ports & {master_port, master_port + 1}:
        raise LaunchPlanError(f"--master-port={master_port} (and +1) collides with SGLang ports on node 0; "
                              "change --master-port or rollout.sglang.base_port")  # fmt: skip
    return planned


def make_plan(
    config_path: str,
    *,
    nodes: int,
    gpus_per_node: int,
    rollout_nodes: int = 0,
    colocate: bool = False,
    cpu: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    hostnames: list[str] | None = None,
    addresses: list[str] | None = None,
    run_dir: str | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
    python: str = "python3",
    torchrun_log_dir: str | None = None,
) -> LaunchPlan:
    """Validate config + allocation and lay out every node's processes (raises LaunchPlanError).

    SGLang servers take their sizes from ``rollout.sglang`` (tp_size, mem_fraction_static, dtype,
    context_length, extra_args, base_port); the trainer is pointed at them with config overrides.
    """
    overrides = list(overrides)
    _check_sizes(nodes, gpus_per_node, rollout_nodes, colocate, cpu)
    hostnames = list(hostnames) if hostnames else [f"node{i}" for i in range(nodes)]
    if len(hostnames) != nodes:
        raise LaunchPlanError(f"{len(hostnames)} hostnames given ({','.join(hostnames)}) for --nodes={nodes}")
    addresses = list(addresses) if addresses else list(hostnames)
    if len(addresses) != nodes:
        raise LaunchPlanError(f"{len(addresses)} addresses given for --nodes={nodes}")
    if not 0 < master_port < 65535:
        raise LaunchPlanError(f"--master-port={master_port} is not a port")
    # lazily: the node-side modes (--emit-node-cmd, --wait-healthy) run often and need no config tree
    from megatron_scpo.config import load_config

    cfg = load_config(config_path, overrides)

    train_nodes = nodes - rollout_nodes
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = check_parallel_fit(tp, pp, train_nodes, gpus_per_node, "procs" if cpu else "GPUs")
    run_dir = run_dir or cfg.run_dir or f"runs/{cfg.name}"
    notes: list[str] = []
    launch_servers = (colocate or rollout_nodes > 0) and not cpu
    engine = _rollout_engine(cfg, config_path, launch_servers, cpu, gpus_per_node, notes)

    node_plans = [
        NodePlan(index=i, name=name, address=addr, group="train" if i < train_nodes else "rollout",
                 role=("train+rollout" if colocate else "train") if i < train_nodes else "rollout")
        for i, (name, addr) in enumerate(zip(hostnames, addresses))
    ]  # fmt: skip
    master_addr = node_plans[0].address
    router_url: str | None = None
    server_urls: list[str] = []
    trainer_overrides = list(overrides)
    if launch_servers:
        server_nodes = node_plans[:train_nodes] if colocate else node_plans[train_nodes:]
        server_urls, router_url = _add_sglang(cfg, server_nodes, gpus_per_node, colocate, python, notes)
        planned = _sglang_overrides(cfg, server_nodes, server_urls, router_url, master_addr, master_port, notes)
        trainer_overrides += [f"{k}={v}" for k, v in planned.items() if not _has_override(overrides, k)]

    env = {"SCPO_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if cpu else {}
    for n in node_plans[:train_nodes]:
        n.ranks = list(range(n.index * gpus_per_node, (n.index + 1) * gpus_per_node))
        n.wait_for = [router_url + "/health"] if router_url else []
        argv = [
            python, "-m", "torch.distributed.run",
            f"--nnodes={train_nodes}", f"--nproc-per-node={gpus_per_node}", f"--node-rank={n.index}",
            f"--master-addr={master_addr}", f"--master-port={master_port}", "--max-restarts=0",
        ]  # fmt: skip
        if torchrun_log_dir:  # per-rank stdout/stderr files (and still teed into the node's trainer log)
            argv += [f"--log-dir={torchrun_log_dir}/{n.name}", "--redirects=3", "--tee=3"]
        # overrides before --run-dir: `scpo train` takes its positionals first
        argv += ["-m", "megatron_scpo.cli", "train", config_path, *trainer_overrides, "--run-dir", run_dir]
        n.processes.append(Process("trainer", "main", argv, env=dict(env)))

    return LaunchPlan(
        config=config_path, overrides=overrides, run_dir=run_dir, nodes=nodes, gpus_per_node=gpus_per_node,
        train_nodes=train_nodes, rollout_nodes=rollout_nodes, colocate=colocate, cpu=cpu, tp=tp, pp=pp, dp=dp,
        world_size=train_nodes * gpus_per_node, master_addr=master_addr, master_port=master_port, engine=engine,
        router_url=router_url, sglang_servers=server_urls, notes=notes, node_plans=node_plans,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- node side
def emit_node_lines(plan: LaunchPlan, node_name: str) -> list[str]:
    """Tab-separated lines for launch/node.sh: ``wait<TAB>URL`` and ``KIND<TAB>NAME<TAB>HEALTH<TAB>CMD``."""
    node = plan.node(node_name)
    lines = [f"wait\t{url}" for url in node.wait_for]
    # services first (the node starts them, waits for health, then starts the mains)
    for p in sorted(node.processes, key=lambda p: p.kind != "service"):
        lines.append(f"{p.kind}\t{p.name}\t{p.health_url or '-'}\t{p.shell()}")
    return lines


def wait_healthy(urls: list[str], timeout: float, interval: float = 2.0) -> list[str]:
    """Poll ``urls`` until each answers HTTP 200 or ``timeout`` passes; returns the ones still down."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while True:
        still = []
        for url in pending:
            try:
                with urllib.request.urlopen(url, timeout=max(1.0, min(5.0, timeout))) as r:
                    if r.status != 200:
                        still.append(url)
            except (urllib.error.URLError, OSError, ValueError):
                still.append(url)
        pending = still
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------------------------------------- CLI
def _csv(text: str | None) -> list[str] | None:
    return [t for t in text.split(",") if t] if text else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scpo launch",
        description="Plan a multi-node job: print the exact command each node runs (nothing is started).",
    )
    p.add_argument("config", nargs="?", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides (passed on to the trainer)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (the default action)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (CPU mode: processes per node)")
    p.add_argument("--rollout-nodes", type=int, default=0, help="nodes that only run SGLang servers + router")
    p.add_argument("--colocate", action="store_true", help="run SGLang servers on the training nodes' GPUs")
    p.add_argument("--cpu", action="store_true", help="CPU test mode: gloo, no GPUs, local rollout engine")
    p.add_argument("--hostnames", help="comma-separated node names (default node0,node1,...)")
    p.add_argument("--addresses", help="comma-separated node addresses (default: the hostnames)")
    p.add_argument("--run-dir", help="run directory (default: config run_dir, else runs/<name>)")
    p.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT)
    p.add_argument("--python", default="python3", help="interpreter the nodes use")
    p.add_argument("--torchrun-log-dir", help="per-rank torchrun logs under DIR/<node>/")
    g = p.add_argument_group("used by launch/*.slurm")
    g.add_argument("--write-plan", metavar="JSON", help="validate, write the plan JSON (+ .env next to it)")
    g.add_argument("--emit-node-cmd", action="store_true", help="print NODE's lines from --plan (for node.sh)")
    g.add_argument("--plan", metavar="JSON", help="a plan written by --write-plan")
    g.add_argument("--node", metavar="NAME", help="node name for --emit-node-cmd")
    g.add_argument("--wait-healthy", nargs="+", metavar="URL", help="exit 0 once every URL answers 200")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds for --wait-healthy")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.wait_healthy:
        down = wait_healthy(args.wait_healthy, args.timeout)
        if down:
            print(f"scpo launch: not healthy after {args.timeout:g}s: {' '.join(down)}", file=sys.stderr)
            return 1
        return 0
    if args.emit_node_cmd:
        if not args.plan or not args.node:
            print("scpo launch: --emit-node-cmd needs --plan JSON and --node NAME", file=sys.stderr)
            return 2
        try:
            plan = LaunchPlan.from_json(Path(args.plan).read_text())
            print("\n".join(emit_node_lines(plan, args.node)))
        except (OSError, ValueError) as e:
            print(f"scpo launch: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        print("scpo launch: a CONFIG is required (scpo launch --dry-run CONFIG --nodes N ...)", file=sys.stderr)
        return 2
    try:
        plan = make_plan(
            args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, rollout_nodes=args.rollout_nodes,
            colocate=args.colocate, cpu=args.cpu, overrides=args.overrides, hostnames=_csv(args.hostnames),
            addresses=_csv(args.addresses), run_dir=args.run_dir, master_port=args.master_port,
            python=args.python,
            torchrun_log_dir=args.torchrun_log_dir,
        )  # fmt: skip
    except ConfigError as e:
        print(f"scpo launch: error: {e}", file=sys.stderr)
        return 2
    if args.write_plan:
        out = Path(args.write_plan)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(plan.to_json())
        out.with_suffix(".env").write_text(plan.shell_env())
    print(plan.to_json() if args.json else plan.format_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
