"""SGLangEngine: rollouts and weight sync through SGLang's native HTTP API (0.5.x).

Servers are either launched and supervised here (``python -m sglang.launch_server`` per server, each in
its own process group so it can be killed with its scheduler/detokenizer children) or attached to by URL
(several workers, optionally behind one sglang-router that takes the generation traffic).

Request bodies carry only documented keys: SGLang 0.5.23 answers 400 to unknown sampling keys. Transient
failures (connection refused/reset, timeouts, HTTP 5xx) are retried with exponential backoff; the final
error names the URL and endpoint. Weight sync is pause -> update (bucketed) -> set version -> flush_cache ->
continue, then every worker's ``weight_version`` is checked. Before generating or scoring, every worker's
``weight_version`` is compared with the engine's: a server that restarted (``"default"``) is brought back to
the current weights (disk sync: reload the live ``weights_v<N>`` dir) before it serves, or refused with a
``WeightSyncError`` naming it (tensor/distributed sync: only the trainer holds the weights).

Sources (SGLang, the CPU build in ../shared/sglang-cpu, commit 2f14d6c): ``sglang/srt/entrypoints/http_server.py``
(endpoints), ``sglang/srt/managers/io_struct.py`` (request fields), ``sglang/srt/server_args.py`` (flags),
``sglang/srt/utils/common.py:init_custom_process_group`` (the weight-update group).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import requests
import torch
from torch import Tensor

from megatron_scpo.backend.parallel import free_port
from megatron_scpo.rollout.base import (
    RolloutServerError,
    Sample,
    SamplingParams,
    WeightSyncError,
    validate_n,
    validate_prompts,
    validate_score_inputs,
)
from megatron_scpo.rollout.config import SGLangConfig

RETRY_STATUSES = frozenset({500, 502, 503, 504})


# ------------------------------------------------------------------------------------------ helpers
def serialize_named_tensors(named_tensors: list[tuple[str, Tensor]]) -> str:
    """SGLang's wire format for update_weights_from_tensor: base64(ForkingPickler(list of (name, tensor))).

    ForkingPickler shares storage instead of copying it (CUDA IPC on GPU), so it only works when the
    server runs on the same node as the trainer (colocated).
    """
    buf = io.BytesIO()
    ForkingPickler(buf).dump(named_tensors)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bucket_named_tensors(named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Group a tensor stream into buckets of at least ``bucket_bytes`` (a big tensor is its own bucket)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, t in named_tensors:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def parse_weight_version(v: Any) -> int | None:
    """SGLang reports weight_version as a string; "default" is the checkpoint it started from (0)."""
    if v == "default":
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def build_launch_command(
    cfg: SGLangConfig, index: int, model_path: str, python: str | None = None, *, nccl_port: int | None = None
) -> list[str]:
    """The one ``python -m sglang.launch_server`` command line: server ``index`` of ``cfg`` (its port and GPUs
    offset by ``index``).

    Every server we start comes from here: the engine's launch mode (``index`` 0..num_servers-1) and the SLURM plan
    (``launch_plan``, one config per server: its node's host, port and GPU slice as ``host`` / ``base_port`` /
    ``base_gpu_id``, index 0). The interpreter is ``python``, else ``cfg.python`` (SGLang's own environment), else
    ``sys.executable``; ``cfg.launcher`` is prepended (e.g. a container runtime). ``--mem-fraction-static`` /
    ``--context-length`` only when set (else SGLang's defaults); ``nccl_port`` fixes ``--nccl-port`` (several
    servers on one node must not race for a random one); ``cfg.extra_args`` come last, verbatim.
    Flags: ``sglang/srt/server_args.py``.
    """
    cmd = [
        *cfg.launcher, python or cfg.python or sys.executable, "-m", "sglang.launch_server",
        "--model-path", model_path,
        "--host", cfg.host,
        "--port", str(cfg.base_port + index),
        "--tp-size", str(cfg.tp_size),
        "--base-gpu-id", str(cfg.base_gpu_id + index * cfg.tp_size),
        "--dtype", cfg.dtype,
    ]  # fmt: skip
    if cfg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.context_length is not None:
        cmd += ["--context-length", str(cfg.context_length)]
    if nccl_port is not None:
        cmd += ["--nccl-port", str(nccl_port)]
    return cmd + list(cfg.extra_args)


def init_custom_process_group(
    backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout_s: float = 600.0
) -> Any:
    """A process group that is not the default one, with store keys prefixed by ``group_name``.

    SGLang's servers join the weight-update group this way (its ``init_custom_process_group``); a plain
    ``dist.init_process_group`` on the trainer side uses different store keys and hangs.
    """
    from torch.distributed import distributed_c10d as c10d
    from torch.distributed.rendezvous import rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (one snapshot of /proc/*/stat; Linux)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kids.setdefault(int(rest[1]), []).append(int(stat.parent.name))
    out, queue = [], [pid]
    while queue:
        p = queue.pop()
        out.append(p)
        queue += kids.get(p, [])
    return out


def kill_process_tree(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM ``pid``, its process group and every descendant found by PID, SIGKILL what is left after
    ``timeout_s`` (SGLang's graceful exit can hang with open requests; its scheduler and detokenizer are
    children of the launcher). Waits until all of them are gone."""
    pids = process_tree(pid)

    def alive(p: int) -> bool:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(alive(p) for p in pids):
            return


# ------------------------------------------------------------------------------------------ engine
class SGLangEngine:
    """RolloutEngine over SGLang servers (launched here or attached to by URL)."""

    def __init__(
        self,
        cfg: SGLangConfig,
        urls: list[str] | None = None,
        *,
        vocab_size: int | None = None,
        max_context_len: int | None = None,
        launch: bool | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.weight_version = 0
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        self._local = threading.local()
        self._paused = False
        self._pg: Any = None
        self._disk_dirs: list[Path] = []
        urls = [u.rstrip("/") for u in (urls or [])]
        launch = not urls if launch is None else launch
        if launch:
            if not cfg.model_path:
                raise ValueError("SGLangEngine: launching servers needs rollout.sglang.model_path")
            urls = [f"http://{cfg.host}:{cfg.base_port + i}" for i in range(cfg.num_servers)]
        if not urls:
            raise ValueError("SGLangEngine: no server URLs given (rollout.sglang_urls) and launch disabled")
        self.worker_urls = urls
        self.gen_urls = [cfg.router_url.rstrip("/")] if cfg.router_url else urls
        self.vocab_size, self.max_context_len = vocab_size, max_context_len
        if cfg.model_path and (Path(cfg.model_path) / "config.json").exists():
            hf = json.loads((Path(cfg.model_path) / "config.json").read_text())
            self.vocab_size = self.vocab_size or hf.get("vocab_size")
            self.max_context_len = self.max_context_len or cfg.context_length or hf.get("max_position_embeddings")
        if launch:
            self._launch()
        self.wait_until_healthy(cfg.startup_timeout_s)

    # ---------------------------------------------------------------- HTTP
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # never route 127.0.0.1 / cluster-internal traffic through a proxy
            self._local.session = s
        return s

    def _call(
        self, url: str, path: str, payload: dict | None = None, *, method: str = "POST", retries: int | None = None,
        timeout: float | None = None, retry_statuses: frozenset[int] = RETRY_STATUSES,
    ) -> Any:
        """One JSON request with retries on transient failures; returns the parsed body (or text)."""
        attempts = 1 + (self.cfg.max_retries if retries is None else retries)
        timeout = timeout or self.cfg.request_timeout_s
        last = ""
        for a in range(attempts):
            try:
                r = self._session().request(method, url + path, json=payload, timeout=timeout)
            except requests.Timeout:
                last = f"timed out after {timeout:g} s"
            except requests.ConnectionError as e:
                last = f"connection failed ({type(e).__name__}: {str(e)[:200]})"
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError:
                        return r.text
                last = f"HTTP {r.status_code}: {r.text[:500]}"
                if r.status_code not in retry_statuses:
                    raise RolloutServerError(f"{url}{path}: {last}")
            if a + 1 < attempts:
                time.sleep(self.cfg.retry_backoff_s * 2**a)
        raise RolloutServerError(f"{url}{path}: failed after {attempts} attempt(s): {last}")

    def _all_workers(self, path: str, payload: dict | None = None, **kw: Any) -> list[Any]:
        with ThreadPoolExecutor(max_workers=len(self.worker_urls)) as ex:
            return list(ex.map(lambda u: self._call(u, path, payload, **kw), self.worker_urls))

    # ---------------------------------------------------------------- lifecycle
    def _launch(self) -> None:
        self._log_dir = Path(self.cfg.log_dir or tempfile.mkdtemp(prefix="scpo_sglang_"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.cfg.num_servers):
            self._logs.append(self._log_dir / f"sglang_{i}.log")
            self._procs.append(self._start_server(i))

    def _start_server(self, i: int) -> subprocess.Popen:
        cmd = build_launch_command(self.cfg, i, str(self.cfg.model_path))
        env = {**os.environ, **self.cfg.env}
        with open(self._logs[i], "ab") as f:
            f.write(("+ " + " ".join(cmd) + "\n").encode())
            f.flush()
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)

    @property
    def server_pids(self) -> list[int]:
        """PIDs of the servers launched here (launch mode; each is its process group's leader)."""
        return [p.pid for p in self._procs]

    def restart(self, index: int) -> None:
        """Stop (if still running) and start launched server ``index`` on the same port, wait for it, and give it
        the current weights before it serves (see ``ensure_current_weights``)."""
        if not 0 <= index < len(self._procs):
            raise ValueError(f"restart: no launched server {index} (launch mode has {len(self._procs)})")
        kill_process_tree(self._procs[index].pid)
        self._procs[index].wait()
        self._procs[index] = self._start_server(index)
        self.wait_until_healthy(self.cfg.startup_timeout_s)
        self.ensure_current_weights()

    def ensure_current_weights(self) -> None:
        """Every worker must run the engine's weight version before it serves.

        A worker on another version (a restarted server reports ``"default"``) is reloaded from the live disk-sync
        dir when there is one (``update_weights_from_disk``, then flush_cache), else refused with a
        ``WeightSyncError`` naming it. A restarted server also left the distributed weight-update group: the group
        is torn down so that the next sync builds it again with every worker.
        """
        stale = self._stale_workers()
        if not stale:
            return
        if self._pg is not None:
            self._reset_weight_group()
        live = self._live_disk_dir()
        if self.weight_version == 0 and live is None and self.cfg.model_path:
            live = Path(self.cfg.model_path)  # version 0 is the checkpoint the servers start from
        for url, got in stale:
            if live is None:
                raise WeightSyncError(
                    f"{url}: server runs weight version {got!r}, the engine is on {self.weight_version} (restarted "
                    f"or changed by another client) and there is no disk copy to restore from "
                    f"(weight_sync={self.cfg.weight_sync}): call update_weights before generating"
                )
            payload = {"model_path": str(live), "weight_version": str(self.weight_version), "abort_all_requests": False}
            self._check_success(self._call(url, "/update_weights_from_disk", payload, retries=0), "update_weights_from_disk")
            self._call(url, "/flush_cache", None, retry_statuses=RETRY_STATUSES | {400})
        self._check_version(self.weight_version)

    def _stale_workers(self) -> list[tuple[str, Any]]:
        """(url, reported version) of every worker whose weight_version is not the engine's."""
        stale = []
        for url in self.worker_urls:
            info = self._call(url, "/model_info", method="GET")
            got = info.get("weight_version") if isinstance(info, dict) else None
            if parse_weight_version(got) != self.weight_version:
                stale.append((url, got))
        return stale

    def _reset_weight_group(self) -> None:
        for url in self.worker_urls:
            try:
                self._call(url, "/destroy_weights_update_group", {"group_name": "weight_update_group"}, retries=0,
                           timeout=30)
            except RolloutServerError:
                pass  # a restarted server has no group
        try:
            torch.distributed.destroy_process_group(self._pg)
        except (RuntimeError, ValueError):
            pass
        self._pg = None

    def wait_until_healthy(self, timeout_s: float) -> None:
        """Poll GET /health (503 while starting) on every server; a launched server that exits is an error."""
        deadline = time.monotonic() + timeout_s
        pending = list(dict.fromkeys(self.worker_urls + self.gen_urls))
        while pending:
            for i, p in enumerate(self._procs):
                if p.poll() is not None:
                    tail = self._logs[i].read_text(errors="replace")[-2000:] if self._logs[i].exists() else ""
                    raise RolloutServerError(
                        f"{self.worker_urls[i]}: sglang.launch_server exited with code {p.returncode}; "
                        f"log {self._logs[i]}:\n{tail}"
                    )
            pending = [u for u in pending if not self._healthy(u)]
            if pending and time.monotonic() > deadline:
                raise RolloutServerError(f"{pending[0]}/health: not healthy after {timeout_s:g} s")
            if pending:
                time.sleep(0.2)

    def _healthy(self, url: str) -> bool:
        try:
            return self._session().get(url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def health(self) -> bool:
        return all(self._healthy(u) for u in dict.fromkeys(self.worker_urls + self.gen_urls))

    def pause(self) -> None:
        self._all_workers("/pause_generation", {"mode": self.cfg.pause_mode})
        self._paused = True

    def resume(self) -> None:
        self._all_workers("/continue_generation", {})
        self._paused = False

    def shutdown(self) -> None:
        """Stop the servers we launched (whole process group: SGLang's graceful exit can hang)."""
        if self._pg is not None:
            self._reset_weight_group()
        for p in self._procs:
            kill_process_tree(p.pid)
            p.wait()
        self._procs.clear()

    # ---------------------------------------------------------------- generation
    def _sampling_dict(self, params: SamplingParams) -> dict[str, Any]:
        d: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.is_greedy else float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": params.top_k,
        }
        if params.stop:
            d["stop"] = list(params.stop)
        if params.stop_token_ids:
            d["stop_token_ids"] = list(params.stop_token_ids)
        return d

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        """n samples per prompt: each prompt is repeated n times in one batched /generate (radix cache
        shares the prefix), rows split into requests of max_batch_per_request over the servers."""
        params.validate()
        validate_n(n)
        validate_prompts(prompts, params.max_new_tokens, self.max_context_len, self.vocab_size)
        if self._paused:
            raise RuntimeError("SGLangEngine: generate called while paused; call resume() first")
        self.ensure_current_weights()
        rows = [list(p) for p in prompts for _ in range(n)]
        base = self._sampling_dict(params)
        per_row: list[dict] | None = None
        if params.seed is not None:  # distinct seeds, or the n copies of a prompt would sample identically
            per_row = [dict(base, sampling_seed=params.seed + i) for i in range(len(rows))]
        step = self.cfg.max_batch_per_request
        jobs = []
        for k, start in enumerate(range(0, len(rows), step)):
            body = {
                "input_ids": rows[start : start + step],
                "sampling_params": per_row[start : start + step] if per_row else base,
                "return_logprob": True,
                "logprob_start_len": -1,
            }
            jobs.append((self.gen_urls[k % len(self.gen_urls)], body))
        with ThreadPoolExecutor(max_workers=min(len(jobs), 4 * len(self.gen_urls))) as ex:
            results = list(ex.map(lambda j: self._call(j[0], "/generate", j[1]), jobs))
        flat: list[Sample] = []
        for (url, body), res in zip(jobs, results):
            if not isinstance(res, list) or len(res) != len(body["input_ids"]):
                raise RolloutServerError(f"{url}/generate: expected a list of {len(body['input_ids'])} results")
            flat += [self._parse_sample(url, ids, r) for ids, r in zip(body["input_ids"], res)]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _parse_sample(url: str, prompt: list[int], r: dict) -> Sample:
        try:
            meta = r["meta_info"]
            lps = meta["output_token_logprobs"]
            token_ids = [int(x[1]) for x in lps]
            logprobs = [x[0] for x in lps]
            fr = meta["finish_reason"] or {}
            kind = fr.get("type")
        except (KeyError, TypeError, IndexError) as e:
            raise RolloutServerError(f"{url}/generate: malformed response ({e!r}): {str(r)[:300]}") from e
        if any(lp is None for lp in logprobs):
            raise RolloutServerError(f"{url}/generate: null log-prob in output_token_logprobs")
        if "output_ids" in r and list(r["output_ids"]) != token_ids:
            raise RolloutServerError(f"{url}/generate: output_ids disagree with output_token_logprobs ids")
        if kind not in ("stop", "length", "abort"):
            raise RolloutServerError(f"{url}/generate: unknown finish_reason {fr!r}")
        return Sample(
            prompt_ids=prompt, token_ids=token_ids, text=r.get("text", ""), logprobs=[float(x) for x in logprobs],
            finish_reason=kind, weight_version=parse_weight_version(meta.get("weight_version")),
            matched_stop=fr.get("matched"),
        )

    def score(self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0) -> list[list[float]]:
        """Prompt log-probs via /generate with max_new_tokens 0 and logprob_start_len 0.

        Whether SGLang applies the temperature to *input* log-probs depends on the version; the post-sync
        check therefore uses T = 1 by default.
        """
        validate_score_inputs(sequences, prompt_lens, temperature, self.max_context_len, self.vocab_size)
        self.ensure_current_weights()
        body = {
            "input_ids": [list(s) for s in sequences],
            "sampling_params": {"max_new_tokens": 0, "temperature": float(temperature)},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        url = self.gen_urls[0]
        res = self._call(url, "/generate", body)
        out = []
        for s, pl, r in zip(sequences, prompt_lens, res):
            lps = r["meta_info"]["input_token_logprobs"]
            if len(lps) != len(s) or [int(x[1]) for x in lps] != list(s):
                raise RolloutServerError(f"{url}/generate: input_token_logprobs do not match the scored sequence")
            vals = [x[0] for x in lps[pl:]]
            if any(v is None for v in vals):
                raise RolloutServerError(f"{url}/generate: null log-prob in input_token_logprobs")
            out.append([float(v) for v in vals])
        return out

    # ---------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """pause -> bucketed update -> version -> flush_cache -> continue, then check every worker's version."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise WeightSyncError(f"update_weights: version must be an int >= 0, got {version!r}")
        mode = self.cfg.weight_sync
        if mode == "distributed" and self._pg is not None and self._stale_workers():
            self._reset_weight_group()  # a restarted server left the group: broadcasts to it would hang
        try:
            self.pause()
            if mode == "disk":
                self._sync_disk(named_tensors, version)
            else:
                send: Callable[[list[tuple[str, Tensor]]], None] = (
                    self._send_tensor_bucket if mode == "tensor" else self._send_distributed_bucket
                )
                for bucket in bucket_named_tensors(named_tensors, int(self.cfg.weight_bucket_mb * 2**20)):
                    send(bucket)
                self._all_workers("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})
            # 400 while requests are still running: retry it like a transient failure
            self._all_workers("/flush_cache", None, retry_statuses=RETRY_STATUSES | {400})
        except BaseException as e:
            try:  # never leave the servers paused; the first error is the one to report
                self.resume()
            except RolloutServerError:
                pass
            if isinstance(e, RolloutServerError):
                raise WeightSyncError(f"weight sync ({mode}) to version {version} failed: {e}") from e
            raise
        self.resume()
        self._check_version(version)
        self.weight_version = version
        self._prune_disk_dirs()  # after a tensor/distributed sync no disk copy is current

    def _check_version(self, version: int) -> None:
        for url in self.worker_urls:
            info = self._call(url, "/model_info", method="GET")
            got = info.get("weight_version") if isinstance(info, dict) else None
            if parse_weight_version(got) != version:
                raise WeightSyncError(f"{url}: weight_version is {got!r} after sync, expected {str(version)!r}")

    def _send_tensor_bucket(self, bucket: list[tuple[str, Tensor]]) -> None:
        def send(url: str) -> Any:
            # a fresh handle per worker and TP rank: a shared-storage handle may be opened only once
            payload = {
                "serialized_named_tensors": [serialize_named_tensors(bucket) for _ in range(self.cfg.tp_size)],
                "flush_cache": False,
                "abort_all_requests": False,
            }
            return self._call(url, "/update_weights_from_tensor", payload, retries=0)

        with ThreadPoolExecutor(max_workers=len(self.worker_urls)) as ex:
            for res in ex.map(send, self.worker_urls):
                self._check_success(res, "update_weights_from_tensor")

    def _send_distributed_bucket(self, bucket: list[tuple[str, Tensor]]) -> None:
        if self._pg is None:
            self._init_weight_group()
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": "weight_update_group",
            "flush_cache": False,
            "abort_all_requests": False,
        }
        device = "cuda" if self.cfg.sync_backend == "nccl" else "cpu"
        with ThreadPoolExecutor(max_workers=1) as ex:  # servers block in the request until the broadcasts end
            fut = ex.submit(self._all_workers, "/update_weights_from_distributed", payload, retries=0)
            for _, t in bucket:
                torch.distributed.broadcast(t.detach().to(device).contiguous(), src=0, group=self._pg)
            results = fut.result()
        for res in results:
            self._check_success(res, "update_weights_from_distributed")

    def _init_weight_group(self) -> None:
        port = self.cfg.sync_master_port or free_port()
        world = 1 + len(self.worker_urls) * self.cfg.tp_size
        with ThreadPoolExecutor(max_workers=len(self.worker_urls)) as ex:
            futs = [
                ex.submit(self._call, url, "/init_weights_update_group", {
                    "master_address": self.cfg.sync_master_addr, "master_port": port,
                    "rank_offset": 1 + i * self.cfg.tp_size, "world_size": world,
                    "group_name": "weight_update_group", "backend": self.cfg.sync_backend,
                }, retries=0)
                for i, url in enumerate(self.worker_urls)
            ]  # fmt: skip
            self._pg = init_custom_process_group(
                self.cfg.sync_backend, f"tcp://{self.cfg.sync_master_addr}:{port}", world, 0, "weight_update_group"
            )
            for f in futs:
                self._check_success(f.result(), "init_weights_update_group")

    def _sync_disk(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Write an HF checkpoint dir ``weights_v<version>`` and have every worker load it.

        The dir is what ``convert.hf_io`` writes for every HF export (``write_safetensors``: ``model.safetensors``,
        or shards of at most ``weight_bucket_mb`` + ``model.safetensors.index.json``; ``copy_side_files``: the
        base checkpoint's config, generation config and tokenizer files), so SGLang loads it like any HF model.
        Tensors are copied as they stream in (the trainer may reuse its buffers; tied views must not share storage).
        """
        from megatron_scpo.convert.hf_io import copy_side_files, write_safetensors

        root = Path(self.cfg.disk_sync_dir or tempfile.mkdtemp(prefix="scpo_weights_"))
        out = root / f"weights_v{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if self.cfg.model_path:
            copy_side_files(self.cfg.model_path, out)
        # one host copy per tensor (own storage: tied or reused export buffers never alias in the file)
        owned = ((n, t.detach().to("cpu", copy=True).contiguous()) for n, t in named_tensors)
        write_safetensors(owned, out, max_shard_bytes=int(self.cfg.weight_bucket_mb * 2**20))
        # flush_cache False: SGLang's in-request flush asserts (and kills the scheduler) when a request is still
        # running, e.g. a router health probe admitted after the pause; we flush afterwards with retries instead
        payload = {"model_path": str(out), "weight_version": str(version), "abort_all_requests": False,
                   "flush_cache": False}
        if out not in self._disk_dirs:
            self._disk_dirs.append(out)
        for res in self._all_workers("/update_weights_from_disk", payload, retries=0):
            self._check_success(res, "update_weights_from_disk")

    def _live_disk_dir(self) -> Path | None:
        """The disk-sync dir of the engine's current version, if it was written by a successful sync."""
        name = f"weights_v{self.weight_version}"
        return next((d for d in self._disk_dirs if d.name == name and d.is_dir()), None)

    def _prune_disk_dirs(self) -> None:
        """Keep only the live version on disk (after its sync passed the version check)."""
        live = self._live_disk_dir()
        for d in self._disk_dirs:
            if d != live:
                shutil.rmtree(d, ignore_errors=True)
        self._disk_dirs = [live] if live is not None else []

    @staticmethod
    def _check_success(res: Any, what: str) -> None:
        if not (isinstance(res, dict) and res.get("success", False)):
            raise WeightSyncError(f"{what}: server reported failure: {str(res)[:500]}")


__all__ = [
    "SGLangEngine", "build_launch_command", "bucket_named_tensors", "kill_process_tree", "process_tree",
    "serialize_named_tensors",
]
