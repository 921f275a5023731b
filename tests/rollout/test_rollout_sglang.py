"""SGLangEngine against the SGLang API stand-in (tests/rollout/sglang_standin.py), on 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from rollout_tiny import EOS, VOCAB, tiny_llama, tiny_tokenizer
from sglang_standin import SGLangStandin

from megatron_scpo.rollout import (
    LogprobMismatchError,
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_generate_batched_n_and_logprobs(server):
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


def test_greedy_stop_strings_and_score(server):
    eng = SGLangEngine(cfg(), [server.url], vocab_size=VOCAB, max_context_len=128)
    local = LocalEngine(tiny_llama(seed=0), tiny_tokenizer(), eos_token_ids=[EOS])
    g = SamplingParams(max_new_tokens=20, temperature=0.0)
    remote = eng.generate(PROMPTS, 2, g)
    expect = local.generate(PROMPTS, 1, g)
    assert [[s.token_ids for s in grp] for grp in remote] == [[e[0].token_ids] * 2 for e in expect]
    body = [b for p, b in server.requests if p == "/generate"][-1]
    assert body["sampling_params"] == {"max_new_tokens": 20, "temperature": 0.0, "top_p": 1.0, "top_k": -1}
    base = expect[0][0]
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    s = eng.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop]))[0][0]
    assert s.finish_reason == "stop" and s.matched_stop == stop and s.text == base.text[: base.text.index(stop)]
    # post-sync check through /generate(max_new_tokens=0, logprob_start_len=0)
    seqs, pls = make_check_sequences(VOCAB, num=3, seq_len=12)
    m = check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(local.model, a, b, t), seqs, pls, 1e-4)
    assert m["rollout_logprob_abs_diff_max"] < 1e-5


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


def test_503_before_ready_retries_restart_timeout_dead_server():
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
        # server restart on the same port while the client retries (refused, then 503 while starting)
        s.stop()
        threading.Timer(0.1, s.start).start()
        eng.cfg.retry_backoff_s, eng.cfg.max_retries = 0.2, 4
        assert eng.generate([[3, 4]], 1, p)[0][0].finish_reason in ("stop", "length")
        # timeouts: every attempt times out -> error names the URL after the retry budget
        s.delay_s = 1.0
        eng.cfg.request_timeout_s, eng.cfg.max_retries, eng.cfg.retry_backoff_s = 0.2, 1, 0.01
        with pytest.raises(RolloutServerError, match=rf"{s.url}/generate: failed after 2 attempt\(s\): timed out"):
            eng.generate([[3, 4]], 1, p)
        s.delay_s = 0.0
        # dead server
        s.stop()
        assert not eng.health()
        with pytest.raises(RolloutServerError, match=rf"{s.url}/generate: failed after 2 attempt\(s\): connection"):
            eng.generate([[3, 4]], 1, p)
        with pytest.raises(RolloutServerError, match=rf"{s.url}/health: not healthy after 0.3 s"):
            SGLangEngine(cfg(startup_timeout_s=0.3), [s.url])
    finally:
        s.stop()


def fake_sglang_package(root: Path) -> Path:
    """A ``sglang`` package whose launch_server module runs the stand-in (see sglang_standin.launch_main)."""
    pkg = root / "fake_sglang" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom sglang_standin import launch_main\n"
        "launch_main(sys.argv[1:])\n"
    )
    return pkg.parent


@pytest.mark.parametrize("mode", ["disk", "tensor", "distributed"])
def test_weight_sync(tmp_path, mode, monkeypatch):
    base = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    c = cfg(weight_sync=mode, weight_bucket_mb=0.05, model_path=str(base), sync_backend="gloo",
            disk_sync_dir=str(tmp_path / "sync"), log_dir=str(tmp_path / "logs"), base_port=free_port(),
            startup_timeout_s=180.0)
    s = None
    if mode == "distributed":
        # the trainer joins a gloo group with the server, which must then be another process: launch mode, a
        # real subprocess started, health-polled and killed by SGLangEngine (a fake sglang runs the stand-in)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake_sglang_package(tmp_path)), *sys.path]))
        eng = SGLangEngine(c)
        url = eng.worker_urls[0]
        assert url == f"http://127.0.0.1:{c.base_port}" and len(eng._procs) == 1
    else:
        s = make_server()
        url = s.url
        eng = SGLangEngine(c, [url], launch=False)
    try:
        assert eng.vocab_size == VOCAB and eng.max_context_len == 128  # read from model_path/config.json
        g = SamplingParams(max_new_tokens=12, temperature=0.0)
        before = [x[0].token_ids for x in eng.generate(PROMPTS, 1, g)]
        new = tiny_llama(seed=9)
        named = list(new.state_dict().items())
        for version in (1, 2):  # second sync reuses the weight-update group / replaces the disk dir
            eng.update_weights(iter(named), version)
        after = eng.generate(PROMPTS, 1, g)
        expected = LocalEngine(new, eos_token_ids=[EOS]).generate(PROMPTS, 1, g)
        assert [x[0].token_ids for x in after] == [e[0].token_ids for e in expected] != before
        assert eng.weight_version == 2 and all(x[0].weight_version == 2 for x in after)
        paths = requests.get(url + "/_standin/requests").json()["paths"]
        i = paths.index("/pause_generation")
        upd = {"disk": "/update_weights_from_disk", "tensor": "/update_weights_from_tensor",
               "distributed": "/update_weights_from_distributed"}[mode]
        assert paths[i + 1] in (upd, "/init_weights_update_group") and "/flush_cache" in paths[i:]
        assert paths.index("/continue_generation", i) > paths.index("/flush_cache", i)
        if mode == "disk":
            assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["weights_v2"]  # old version removed
        else:
            assert paths.count(upd) >= 4  # 50 KB buckets: several requests per sync
        seqs, pls = make_check_sequences(VOCAB, num=2, seq_len=10)
        check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(new, a, b, t), seqs, pls, 1e-4)
        with pytest.raises(LogprobMismatchError, match="max \\|engine - trainer\\|"):
            check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(tiny_llama(seed=0), a, b, t), seqs, pls, 1e-4)
        # a server that reports the wrong version after sync is caught
        requests.post(url + "/_standin/set", json={"lie_version": True})
        with pytest.raises(WeightSyncError, match=f"{url}: weight_version is '999'"):
            eng.update_weights(iter(named), 3)
    finally:
        procs = list(eng._procs)
        eng.shutdown()
        assert all(p.poll() is not None for p in procs)
        if s is not None:
            s.stop()


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
    import base64
    import pickle

    t = torch.arange(6.0).reshape(2, 3)
    back = pickle.loads(base64.b64decode(serialize_named_tensors([("w", t)])))
    assert back[0][0] == "w" and torch.equal(back[0][1], t)
    with pytest.raises(ValueError, match="tp_size"):
        SGLangEngine(SGLangConfig(tp_size=0), ["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="model_path"):
        SGLangEngine(SGLangConfig(), [])


def test_launched_server_that_exits_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(fake_sglang_package(tmp_path)))
    c = cfg(model_path=str(tmp_path), base_port=free_port(), log_dir=str(tmp_path / "logs"), extra_args=["--bogus"])
    with pytest.raises(RolloutServerError, match=r"sglang.launch_server exited with code 2(.|\n)*unrecognized arguments"):
        SGLangEngine(c)


def test_several_workers_and_router():
    a, b = make_server(), make_server()
    try:
        eng = SGLangEngine(cfg(max_batch_per_request=4, weight_sync="tensor"), [a.url, b.url], vocab_size=VOCAB)
        out = eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, seed=1))
        assert [len(g) for g in out] == [2] * 4 and gen_calls(a) == gen_calls(b) == 1  # 8 rows, 2 requests
        new = tiny_llama(seed=5)
        eng.update_weights(list(new.state_dict().items()), 1)
        for s in (a, b):
            assert all(torch.equal(v, new.state_dict()[k]) for k, v in s.engine.model.state_dict().items())
            assert s.weight_version == "1"
        # behind a router: generation goes to the router URL only, weight sync still to every worker
        router = make_server(seed=5)
        try:
            eng = SGLangEngine(cfg(router_url=router.url, weight_sync="tensor"), [a.url, b.url], vocab_size=VOCAB)
            na, nb = gen_calls(a), gen_calls(b)
            eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4))
            assert gen_calls(router) == 1 and (gen_calls(a), gen_calls(b)) == (na, nb)
            eng.update_weights(list(new.state_dict().items()), 2)
            assert a.weight_version == b.weight_version == "2" and router.weight_version == "default"
        finally:
            router.stop()
    finally:
        a.stop()
        b.stop()
