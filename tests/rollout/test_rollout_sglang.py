"""SGLangEngine against the SGLang API stand-in (tests/rollout/sglang_standin.py), on 127.0.0.1 only.

Only what a real server cannot do (see the stand-in's docstring): request layout and seeds, bad input that must
send nothing, injected 4xx/5xx, 503 before ready, timeouts, tensor sync, a rejected bucket. Everything else runs
against real servers in test_rollout_sglang_real.py. Plus the launch command line, the SLURM plan's interpreter
and the private network namespace helper (no server).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from rollout_tiny import EOS, VOCAB, tiny_llama, tiny_tokenizer
from sglang_standin import SGLangStandin

from megatron_scpo.rollout import (
    RolloutInputError,
    RolloutServerError,
    SamplingParams,
    SGLangConfig,
    WeightSyncError,
)
from megatron_scpo.rollout.check import check_logprobs, make_check_sequences
from megatron_scpo.rollout.local import LocalEngine, teacher_forced_logprobs
from megatron_scpo.rollout.sglang import SGLangEngine, build_launch_command, serialize_named_tensors

HERE = Path(__file__).parent
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [20], [30, 31, 32, 33]]


def cfg(**kw) -> SGLangConfig:
    base = dict(max_retries=2, retry_backoff_s=0.05, request_timeout_s=30.0, startup_timeout_s=10.0)
    base.update(kw)
    return SGLangConfig(**base)


def make_server(seed: int = 0, **kw) -> SGLangStandin:
    return SGLangStandin(LocalEngine(tiny_llama(seed=seed), tiny_tokenizer(), eos_token_ids=[EOS]), **kw).start()


@pytest.fixture
def server():
    s = make_server()
    yield s
    s.stop()


def gen_calls(s: SGLangStandin) -> int:
    return sum(p == "/generate" for p, _ in s.requests)


def test_request_layout_rows_and_seeds(server):
    eng = SGLangEngine(cfg(max_batch_per_request=5), [server.url], vocab_size=VOCAB, max_context_len=128)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=11)
    out = eng.generate(PROMPTS, 3, params)
    assert gen_calls(server) == 3  # 12 rows in requests of <= 5
    bodies = [b for p, b in server.requests if p == "/generate"]
    bodies.sort(key=lambda b: b["sampling_params"][0]["sampling_seed"])  # requests run concurrently
    assert [len(b["input_ids"]) for b in bodies] == [5, 5, 2]
    assert bodies[0]["input_ids"][:3] == [PROMPTS[0]] * 3  # each prompt repeated n times
    assert [sp["sampling_seed"] for sp in bodies[0]["sampling_params"]] == [11, 12, 13, 14, 15]
    model = server.engine.model
    for p, group in zip(PROMPTS, out):
        assert len(group) == 3 and len({tuple(s.token_ids) for s in group}) > 1
        for s in group:
            assert s.prompt_ids == p and s.weight_version == 0 and s.finish_reason in ("stop", "length")
            ref = teacher_forced_logprobs(model, [p + s.token_ids], [len(p)], 0.8)[0]
            assert max(abs(a - b) for a, b in zip(s.logprobs, ref)) < 1e-5
            assert s.text == server.engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)
    # same seed -> same samples (the stand-in's sampler is seeded per row)
    again = eng.generate(PROMPTS, 3, params)
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in out]


def test_strict_schema_400_and_bad_input_sends_nothing(server):
    r = requests.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 3}})
    assert r.status_code == 400 and "max_tokens" in r.text
    r = requests.post(server.url + "/generate", json={"input_ids": [1, 2], "return_logprobs": True})
    assert r.status_code == 400
    r = requests.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) <= 3 and "meta_info" in r.json()
    eng = SGLangEngine(cfg(), [server.url], vocab_size=VOCAB, max_context_len=128)
    before = gen_calls(server)
    for prompts, n, params, match in [
        ([], 1, SamplingParams(max_new_tokens=4), "non-empty"),
        ([[1] * 126], 1, SamplingParams(max_new_tokens=4), r"prompts\[0\]: 126 prompt tokens"),
        ([[1]], 1, SamplingParams(max_new_tokens=4, top_p=1.5), "top_p"),
        ([[1]], 1, SamplingParams(max_new_tokens=4, temperature=-0.1), "temperature"),
        ([[1]], 1, SamplingParams(max_new_tokens=-4), "max_new_tokens"),
        ([[1, 400]], 1, SamplingParams(max_new_tokens=4), "out of range"),
        ([[1]], 0, SamplingParams(max_new_tokens=4), "n: "),
    ]:
        with pytest.raises(RolloutInputError, match=match):
            eng.generate(prompts, n, params)
    assert gen_calls(server) == before
    # a 4xx from the server is not retried and names the URL
    server.fail_next = [400]
    with pytest.raises(RolloutServerError, match=rf"{server.url}/generate: HTTP 400"):
        eng.generate([[1]], 1, SamplingParams(max_new_tokens=2))
    assert gen_calls(server) == before + 1


def test_503_before_ready_retries_and_timeouts():
    s = make_server(ready_after_s=0.6)
    try:
        assert requests.get(s.url + "/health").status_code == 503
        t0 = time.monotonic()
        eng = SGLangEngine(cfg(), [s.url], vocab_size=VOCAB)  # waits for /health
        assert time.monotonic() - t0 > 0.3 and eng.health()
        p = SamplingParams(max_new_tokens=4, temperature=0.0)
        s.fail_next = [503, 502]  # transient: retried with backoff
        n0 = gen_calls(s)
        assert len(eng.generate([[3, 4]], 1, p)[0]) == 1 and gen_calls(s) == n0 + 3
        # timeouts: every attempt times out -> error names the URL after the retry budget
        s.delay_s = 3.0  # /generate only (the version GET before it must still answer within the timeout)
        eng.cfg.request_timeout_s, eng.cfg.max_retries, eng.cfg.retry_backoff_s = 1.0, 1, 0.01
        with pytest.raises(RolloutServerError, match=rf"{s.url}/generate: failed after 2 attempt\(s\): timed out"):
            eng.generate([[3, 4]], 1, p)
    finally:
        s.stop()


def test_tensor_weight_sync(tmp_path):
    """weight_sync: tensor (the one sync a CPU SGLang server cannot take over HTTP): pause -> buckets -> version ->
    flush -> continue, several 50 KB buckets, then the new weights serve."""
    s = make_server()
    try:
        eng = SGLangEngine(cfg(weight_sync="tensor", weight_bucket_mb=0.05), [s.url], vocab_size=VOCAB)
        g = SamplingParams(max_new_tokens=12, temperature=0.0)
        before = [x[0].token_ids for x in eng.generate(PROMPTS, 1, g)]
        new = tiny_llama(seed=9)
        named = list(new.state_dict().items())
        for version in (1, 2):
            eng.update_weights(iter(named), version)
        after = eng.generate(PROMPTS, 1, g)
        expected = LocalEngine(new, eos_token_ids=[EOS]).generate(PROMPTS, 1, g)
        assert [x[0].token_ids for x in after] == [e[0].token_ids for e in expected] != before
        assert eng.weight_version == 2 and s.weight_version == "2" and all(x[0].weight_version == 2 for x in after)
        paths = [p for p, _ in s.requests]
        i = paths.index("/pause_generation")
        assert paths[i + 1] == "/update_weights_from_tensor" and paths.count("/update_weights_from_tensor") >= 8
        j = paths.index("/update_weight_version", i)
        assert j < paths.index("/flush_cache", j) < paths.index("/continue_generation", j) < paths.index("/model_info", j)
        assert all(torch.equal(v, new.state_dict()[k]) for k, v in s.engine.model.state_dict().items())
        seqs, pls = make_check_sequences(VOCAB, num=2, seq_len=10)
        check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(new, a, b, t), seqs, pls, 1e-4)
    finally:
        s.stop()


def test_disk_weight_sync_writes_an_hf_dir(tmp_path):
    """weight_sync: disk writes an HF model dir transformers loads as is: the base checkpoint's side files (byte
    copies, no base weights), safetensors shards of at most weight_bucket_mb + an index naming every tensor (one
    ``model.safetensors`` when it fits); tied tensors sharing storage are fine; the server serves the new weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    s = make_server()
    try:
        eng = SGLangEngine(cfg(weight_sync="disk", weight_bucket_mb=0.05, model_path=str(base),
                               disk_sync_dir=str(tmp_path / "sync")), [s.url], vocab_size=VOCAB)
        new = tiny_llama(seed=9, tie=True)
        named = list(new.state_dict().items())  # lm_head.weight and embed_tokens share storage
        eng.update_weights(iter(named), 1)
        out = tmp_path / "sync" / "weights_v1"
        side = sorted(f.name for f in base.iterdir() if not f.name.startswith("model"))
        assert set(side) <= {f.name for f in out.iterdir()} and "config.json" in side and "tokenizer.json" in side
        assert all((out / f).read_bytes() == (base / f).read_bytes() for f in side)
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        shards = sorted(set(index.values()))
        assert len(shards) > 3 and not (out / "model.safetensors").exists()
        assert sorted(f.name for f in out.glob("*.safetensors")) == shards
        sizes = {f: sum(t.numel() * t.element_size() for n, t in named if index[n] == f) for f in shards}
        assert all(b <= 0.05 * 2**20 or list(index.values()).count(f) == 1 for f, b in sizes.items())  # big: alone
        for name, t in named:
            with safe_open(str(out / index[name]), framework="pt") as f:
                assert torch.equal(f.get_tensor(name), t), name
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in new.state_dict().items())
        assert all(torch.equal(v, new.state_dict()[k]) for k, v in s.engine.model.state_dict().items())
        eng.cfg.weight_bucket_mb = 512.0
        eng.update_weights(iter(named), 2)
        assert sorted(f.name for f in (tmp_path / "sync").iterdir()) == ["weights_v2"]  # the old version is pruned
        assert sorted(f.name for f in (tmp_path / "sync" / "weights_v2").glob("model*")) == ["model.safetensors"]
    finally:
        s.stop()


def test_build_engine_attaches_with_the_run_model_dir(server, tmp_path):
    """rollout.build_engine with engine=sglang: attaches to sglang_urls, model_path defaults to the run's HF dir
    (disk sync copies its side files; context length from its config.json), vocab from the tokenizer."""
    from megatron_scpo.rollout import RolloutConfig, build_engine

    hf_dir = tmp_path / "m"
    tiny_llama(seed=0).save_pretrained(hf_dir)
    tok = tiny_tokenizer()
    eng = build_engine(RolloutConfig(engine="sglang", sglang_urls=[server.url + "/"]), hf_dir, tok)
    assert isinstance(eng, SGLangEngine) and eng.worker_urls == [server.url] and not eng.server_pids
    assert (eng.cfg.model_path, eng.vocab_size, eng.max_context_len) == (str(hf_dir), len(tok), 128)
    given = SGLangConfig(model_path="/elsewhere")
    eng = build_engine(RolloutConfig(engine="sglang", sglang_urls=[server.url], sglang=given), hf_dir, tok)
    assert eng.cfg.model_path == "/elsewhere"


def test_weight_sync_failure_resumes_and_names_server(server, tmp_path):
    eng = SGLangEngine(cfg(weight_sync="tensor"), [server.url], vocab_size=VOCAB)
    with pytest.raises(WeightSyncError, match="update_weights_from_tensor: HTTP 400.*cannot load model.bogus"):
        eng.update_weights([("model.bogus", torch.zeros(2))], 1)
    assert server._running.is_set() and eng.weight_version == 0  # resumed, version unchanged
    assert eng.generate([[1, 2]], 1, SamplingParams(max_new_tokens=2))[0][0].weight_version == 0


def test_launch_command_and_serializer():
    c = SGLangConfig(model_path="/ckpt/qwen3-4b", tp_size=2, base_port=31000, mem_fraction_static=0.7,
                     context_length=8192, extra_args=["--disable-radix-cache"])
    cmd = build_launch_command(c, 1, "/ckpt/qwen3-4b", python="python")
    assert cmd == ["python", "-m", "sglang.launch_server", "--model-path", "/ckpt/qwen3-4b", "--host", "127.0.0.1",
                   "--port", "31001", "--tp-size", "2", "--base-gpu-id", "2", "--dtype", "auto",
                   "--mem-fraction-static", "0.7", "--context-length", "8192", "--disable-radix-cache"]
    # the servers' own interpreter (rollout.sglang.python) and a launcher prefix; default: this interpreter
    c2 = SGLangConfig(model_path="/m", python="/opt/sglang/bin/python", launcher=["apptainer", "exec", "sgl.sif"])
    assert build_launch_command(c2, 0, "/m")[:6] == ["apptainer", "exec", "sgl.sif", "/opt/sglang/bin/python", "-m",
                                                     "sglang.launch_server"]
    assert build_launch_command(SGLangConfig(), 0, "/m")[0] == sys.executable
    with pytest.raises(ValueError, match="rollout.sglang.python"):
        SGLangConfig(python=" ").validate()
    import base64
    import pickle

    t = torch.arange(6.0).reshape(2, 3)
    back = pickle.loads(base64.b64decode(serialize_named_tensors([("w", t)])))
    assert back[0][0] == "w" and torch.equal(back[0][1], t)
    with pytest.raises(ValueError, match="tp_size"):
        SGLangEngine(SGLangConfig(tp_size=0), ["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="model_path"):
        SGLangEngine(SGLangConfig(), [])


def test_plan_runs_the_configured_interpreter(tmp_path):
    """rollout.sglang.python / env reach the SLURM plan's servers and router."""
    import yaml

    from megatron_scpo.launch_plan import make_plan

    py = "/opt/sglang/bin/python"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "p", "model": {"hf_path": "/models/m", "dtype": "bfloat16"}, "parallel": {"tp": 1, "pp": 1},
        "rollout": {"engine": "sglang", "sglang": {"python": py, "env": {"SGLANG_USE_CPU_ENGINE": "1"}}},
    }))  # fmt: skip
    plan = make_plan(str(cfg), nodes=2, gpus_per_node=2, rollout_nodes=1, python="python3")
    procs = [p for n in plan.node_plans for p in n.processes]
    servers = [p for p in procs if p.name.startswith("sglang-")]
    (router,) = [p for p in procs if p.name == "router"]
    assert len(servers) == 2 and router.argv[:3] == [py, "-m", "sglang_router.launch_router"]
    for p in [*servers, router]:
        assert p.env == {"SGLANG_USE_CPU_ENGINE": "1"}
    assert all(p.argv[:3] == [py, "-m", "sglang.launch_server"] for p in servers)
    # without the key: the nodes' interpreter, as before
    cfg.write_text(yaml.safe_dump({"name": "p", "model": {"hf_path": "/models/m"}, "rollout": {"engine": "sglang"}}))
    plan = make_plan(str(cfg), nodes=2, gpus_per_node=2, rollout_nodes=1, python="python3")
    procs = [p for n in plan.node_plans for p in n.processes]
    assert all(p.argv[:3] == ["python3", "-m", "sglang.launch_server"] for p in procs if p.name.startswith("sglang-"))
    assert [p.argv[0] for p in procs if p.name == "router"] == ["python3"]


def test_private_netns_is_entered_and_left(tmp_path):
    """The real-server modules' namespace (tests/rollout/sglang_real.py): inside only loopback, up, and children
    inherit it; afterwards this thread is back where it was (the rest of the session is unaffected)."""
    import subprocess

    from sglang_real import private_netns

    before = os.readlink("/proc/thread-self/ns/net")
    gloo = os.environ.get("GLOO_SOCKET_IFNAME")
    with private_netns() as how:
        assert [n for _, n in socket.if_nameindex()] == ["lo"] and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
        inner = os.readlink("/proc/thread-self/ns/net")
        child = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip()
        assert child == inner and (how == "inherited") == (inner == before)
        with socket.socket() as srv:  # loopback is up: a listener is reachable inside
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            socket.create_connection(srv.getsockname(), timeout=5).close()
    assert os.readlink("/proc/thread-self/ns/net") == before and os.environ.get("GLOO_SOCKET_IFNAME") == gloo
