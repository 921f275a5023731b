"""An SGLang API stand-in: a local HTTP server implementing SGLang 0.5.x's native RL contract strictly.

Real SGLang servers now run in CI (tests/rollout/test_rollout_sglang_real.py, tests/trainer/test_trainer_sglang.py:
generation, log-probs, finish reasons, abort, disk and distributed weight sync, version check, killed and
restarted servers, launch mode, two servers behind sglang-router). The stand-in stays only for what a real
server cannot be made to do on CPU or on demand:

- ``update_weights_from_tensor`` (``weight_sync: tensor``): over HTTP it kills the CPU server
  (../shared/sglang-cpu/README.md, "Known limitations");
- fault injection: answering 5xx/4xx to chosen requests (``fail_next``), slow responses (``delay_s``),
  503 before ready (``ready_after_s``), a bucket the server rejects;
- seeing what the engine sent: the request log (``requests``: nothing sent for bad input, request batching,
  per-row ``sampling_seed`` values, the pause -> update -> flush -> continue order), and seeded sampling
  (``sampling_seed`` is not reproducible on SGLang's CPU build);
- the trainer's RL steps with ``weight_sync: tensor`` (the real-server variant syncs by disk and distributed).

Same endpoints, field names and response layout as SGLang (``meta_info.output_token_logprobs`` as
``[logprob, token_id, text]`` triples, ``finish_reason`` dicts, ``weight_version`` strings), 400 on unknown
request keys (as 0.5.23's contract gate does; the CPU build answers 500), 503 on /health before ready.
Generation is real: a tiny transformers model sampled by LocalEngine. Listens on 127.0.0.1 only. Knobs:
``fail_next`` (statuses to answer instead of handling the next requests; /health and /model_info are never
failed), ``delay_s`` (slow /generate), ``stop()``/``start()`` (restart on the same port), ``lie_version``.
"""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from megatron_scpo.rollout.base import SamplingParams
from megatron_scpo.rollout.local import LocalEngine

# Documented request keys (sglang/srt/managers/io_struct.py and sampling_params.py, 0.5.x).
GENERATE_KEYS = {
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "token_ids_logprob", "return_text_in_logprobs", "stream", "rid", "lora_path", "return_hidden_states",
    "return_routed_experts", "custom_logit_processor",
}  # fmt: skip
SAMPLING_KEYS = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "stop_regex",
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n", "min_new_tokens",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "json_schema", "regex", "ebnf", "logit_bias",
    "sampling_seed", "custom_params",
}  # fmt: skip
ENDPOINT_KEYS = {
    "/update_weights_from_disk": {
        "model_path", "load_format", "abort_all_requests", "weight_version", "is_async", "torch_empty_cache",
        "keep_pause", "recapture_cuda_graph", "token_step", "flush_cache",
    },
    "/update_weights_from_tensor": {
        "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
        "disable_draft_model", "torch_empty_cache",
    },
    "/update_weights_from_distributed": {
        "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version", "load_format",
    },
    "/init_weights_update_group": {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"},
    "/destroy_weights_update_group": {"group_name"},
    "/update_weight_version": {"new_version", "abort_all_requests"},
    "/pause_generation": {"mode"},
    "/continue_generation": set(),
    "/flush_cache": set(),
}  # fmt: skip


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SGLangStandin:
    """One stand-in server; ``url`` is http://127.0.0.1:<port>."""

    def __init__(self, engine: LocalEngine, port: int = 0, ready_after_s: float = 0.0, model_path: str = "tiny") -> None:
        self.engine = engine
        self.port = port
        self.ready_after_s = ready_after_s
        self.model_path = model_path
        self.weight_version = "default"
        self.requests: list[tuple[str, Any]] = []
        self.fail_next: list[int] = []
        self.delay_s = 0.0
        self.lie_version = False
        self.tp_size = 1
        self._lock = threading.Lock()  # the model is not thread-safe: one forward at a time
        self._running = threading.Event()
        self._running.set()
        self._groups: dict[str, Any] = {}
        self._httpd: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- server lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SGLangStandin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                standin._dispatch(self, "GET")

            def do_POST(self) -> None:
                standin._dispatch(self, "POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._ready_at = time.monotonic() + self.ready_after_s
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ---------------------------------------------------------------- HTTP plumbing
    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        body: Any = None
        try:
            n = int(h.headers.get("Content-Length") or 0)
            raw = h.rfile.read(n) if n else b""
            body = json.loads(raw) if raw else None
            self.requests.append((path, body))
            if path not in ("/health", "/health_generate", "/model_info") and self.fail_next:
                raise HTTPError(self.fail_next.pop(0), "injected failure")
            status, out = 200, self._route(method, path, body)
        except HTTPError as e:
            status, out = e.status, {"error": {"message": str(e)}}
        except json.JSONDecodeError as e:
            status, out = 400, {"error": {"message": f"invalid JSON: {e}"}}
        data = out.encode() if isinstance(out, str) else json.dumps(out).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "text/plain" if isinstance(out, str) else "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _route(self, method: str, path: str, body: Any) -> Any:
        if path == "/health":
            if time.monotonic() < self._ready_at:
                raise HTTPError(503, "server is starting")
            return ""
        if time.monotonic() < self._ready_at:
            raise HTTPError(503, "server is starting")
        if path in ("/model_info", "/get_model_info") and method == "GET":
            version = "999" if self.lie_version else self.weight_version
            return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                    "weight_version": version, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        if path == "/health_generate":
            self._generate({"input_ids": [0], "sampling_params": {"max_new_tokens": 1}})
            return ""
        if path == "/flush_cache":
            return "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)\n"  # noqa: E501
        if path == "/_standin/requests":  # test hook (not SGLang): the paths received so far
            return {"paths": [p for p, _ in self.requests]}
        if path == "/_standin/set":  # test hook (not SGLang): fault-injection knobs
            for k, v in body.items():
                if k not in ("lie_version", "delay_s", "fail_next"):
                    raise HTTPError(400, f"unknown knob {k}")
                setattr(self, k, v)
            return {"success": True}
        if method != "POST":
            raise HTTPError(405, f"{method} not allowed on {path}")
        if path == "/generate":
            return self._generate(body)
        if path in ENDPOINT_KEYS:
            body = body or {}
            self._check_keys(body, ENDPOINT_KEYS[path], path)
            return getattr(self, "_" + path.strip("/"))(body)
        raise HTTPError(404, f"no route {path}")

    @staticmethod
    def _check_keys(d: Any, allowed: set[str], where: str) -> None:
        if not isinstance(d, dict):
            raise HTTPError(400, f"{where}: expected an object")
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise HTTPError(400, f"{where}: unknown field(s) {unknown}")

    # ---------------------------------------------------------------- /generate
    def _generate(self, body: Any) -> Any:
        self._check_keys(body, GENERATE_KEYS, "GenerateReqInput")
        if "text" in body:
            raise HTTPError(400, "stand-in: only input_ids requests are implemented")
        ids = body.get("input_ids")
        single = isinstance(ids, list) and bool(ids) and isinstance(ids[0], int)
        batch = [ids] if single else ids
        if not isinstance(batch, list) or not batch or not all(isinstance(r, list) and r for r in batch):
            raise HTTPError(400, "input_ids must be a non-empty list of ints or of lists of ints")
        sp = body.get("sampling_params") or {}
        sps = sp if isinstance(sp, list) else [sp] * len(batch)
        if len(sps) != len(batch):
            raise HTTPError(400, "sampling_params list length differs from the batch size")
        for s in sps:
            self._check_keys(s, SAMPLING_KEYS, "sampling_params")
            if s.get("n", 1) != 1:
                raise HTTPError(400, "stand-in: send n copies of the prompt instead of sampling_params.n")
        start = body.get("logprob_start_len", -1)
        self._running.wait()  # paused in place: hold requests until continue_generation
        if self.delay_s:
            time.sleep(self.delay_s)
        out = [self._one(r, s, bool(body.get("return_logprob")), start) for r, s in zip(batch, sps)]
        return out[0] if single else out

    def _one(self, ids: list[int], s: dict, return_logprob: bool, start: int) -> dict:
        eng = self.engine
        max_new = s.get("max_new_tokens", 128)
        if eng.max_context_len is not None and len(ids) + max_new > eng.max_context_len:
            raise HTTPError(400, f"The input ({len(ids)} tokens) is longer than the model's context length")
        meta: dict[str, Any] = {"id": uuid.uuid4().hex, "prompt_tokens": len(ids), "cached_tokens": 0,
                                "weight_version": self.weight_version, "input_token_logprobs": []}
        text, out_ids, lps, fr = "", [], [], {"type": "length", "length": 0}
        with self._lock:
            if max_new > 0:
                t = float(s.get("temperature", 1.0))
                params = SamplingParams(max_new_tokens=max_new, temperature=t, top_p=s.get("top_p", 1.0),
                                        top_k=s.get("top_k", -1), stop=s.get("stop", []) or [],
                                        stop_token_ids=s.get("stop_token_ids", []) or [], seed=s.get("sampling_seed"))
                smp = eng.generate([ids], 1, params)[0][0]
                text, out_ids, lps = smp.text, smp.token_ids, smp.logprobs
                fr = ({"type": "stop", "matched": smp.matched_stop} if smp.finish_reason == "stop"
                      else {"type": "length", "length": len(out_ids)})
            if return_logprob and start >= 0 and len(ids) > 1:
                t = float(s.get("temperature", 1.0)) or 1.0
                prompt_lp = eng.score([ids], [1], t)[0]
                entries = [[None, ids[0], None]] + [[lp, tok, None] for lp, tok in zip(prompt_lp, ids[1:])]
                meta["input_token_logprobs"] = entries[start:]
        meta.update(completion_tokens=len(out_ids), finish_reason=fr)
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(lps, out_ids)]
        return {"text": text, "output_ids": out_ids, "meta_info": meta}

    # ---------------------------------------------------------------- weights / control
    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Partial load (one bucket at a time), like SGLang's model.load_weights."""
        targets = self.engine.model.state_dict(keep_vars=True)
        with self._lock, torch.no_grad():
            for name, t in named:
                if name not in targets or tuple(targets[name].shape) != tuple(t.shape):
                    raise HTTPError(400, f"cannot load {name} {tuple(t.shape)}")
                targets[name].data.copy_(t)

    def _result(self, version: Any) -> dict:
        if version is not None:
            self.weight_version = str(version)
        return {"success": True, "message": f"Succeeded to update model weights. Version {self.weight_version}.",
                "num_paused_requests": 0}

    def _update_weights_from_disk(self, body: dict) -> dict:
        path = Path(body["model_path"])
        if not (path / "config.json").exists():
            return {"success": False, "message": f"{path}: no config.json", "num_paused_requests": 0}
        named = [kv for f in sorted(path.glob("*.safetensors")) for kv in load_file(str(f)).items()]
        self._load(named)
        return self._result(body.get("weight_version"))

    def _update_weights_from_tensor(self, body: dict) -> dict:
        payloads = body["serialized_named_tensors"]
        if not isinstance(payloads, list) or len(payloads) != self.tp_size:
            raise HTTPError(400, f"serialized_named_tensors needs one entry per TP rank ({self.tp_size})")
        self._load(pickle.loads(base64.b64decode(payloads[0])))
        return self._result(body.get("weight_version"))

    def _init_weights_update_group(self, body: dict) -> dict:
        from megatron_scpo.rollout.sglang import init_custom_process_group

        if body.get("backend", "nccl") != "gloo":
            return {"success": False, "message": "stand-in runs on CPU: backend must be gloo"}
        init = f"tcp://{body['master_address']}:{body['master_port']}"
        name = body.get("group_name", "weight_update_group")
        self._groups[name] = init_custom_process_group("gloo", init, body["world_size"], body["rank_offset"], name)
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def _update_weights_from_distributed(self, body: dict) -> dict:
        pg = self._groups[body.get("group_name", "weight_update_group")]
        named = []
        for name, dt, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dt))
            torch.distributed.broadcast(t, src=0, group=pg)
            named.append((name, t))
        self._load(named)
        return self._result(body.get("weight_version"))

    def _destroy_weights_update_group(self, body: dict) -> dict:
        pg = self._groups.pop(body.get("group_name", "weight_update_group"), None)
        if pg is not None:
            torch.distributed.destroy_process_group(pg)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def _update_weight_version(self, body: dict) -> dict:
        self.weight_version = str(body["new_version"])
        return {"success": True, "message": f"Weight version updated to {self.weight_version}"}

    def _pause_generation(self, body: dict) -> dict:
        if body.get("mode", "abort") not in ("abort", "retract", "in_place"):
            raise HTTPError(400, f"unknown pause mode {body.get('mode')!r}")
        self._running.clear()
        return {"status": "ok", "message": "Generation paused"}

    def _continue_generation(self, body: dict) -> dict:
        self._running.set()
        return {"status": "ok", "message": "Generation continued"}
