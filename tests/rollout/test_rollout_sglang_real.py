"""SGLangEngine against real SGLang servers (the CPU build in ../shared/sglang-cpu), fp32 tiny Llama, loopback.

Two servers per module, launched together by SGLangEngine itself (launch mode with ``rollout.sglang.python`` = the
server venv's interpreter) inside a private network namespace (tests/rollout/sglang_real.py), torn down by PID
even on failure. The tests share it in file order; each one reads the engine's current version instead of
assuming one. Reference log-probs come from transformers on the same weights (the Megatron recompute is in
tests/trainer/test_trainer_sglang.py). Skips only without the server venv (``SCPO_SGLANG_REQUIRED=1`` turns
that into a failure: CI).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from rollout_tiny import EOS, tiny_tokenizer
from sglang_real import (
    pids_alive,
    private_netns,
    real_server_kwargs,
    real_tiny_llama,
    router_available,
    sglang_python,
)

from megatron_scpo.backend.parallel import free_port
from megatron_scpo.rollout import (
    LogprobMismatchError,
    RolloutServerError,
    SamplingParams,
    SGLangConfig,
    WeightSyncError,
)
from megatron_scpo.rollout.check import check_logprobs, make_check_sequences
from megatron_scpo.rollout.local import LocalEngine, teacher_forced_logprobs
from megatron_scpo.rollout.sglang import SGLangEngine, process_tree

PROMPTS = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12], [1, 20], [1, 30, 31, 32, 33]]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
# rows that must still be running when a test pauses or kills the server: greedy, because this random tiny model's
# argmax never reaches EOS (test_finish_reasons_stop_length) while sampled rows hit it by chance within seconds
# (1 token in ~300) and can finish before the event on a fast or quiet machine
IN_FLIGHT = SamplingParams(max_new_tokens=700, temperature=1.0, greedy=True)
VOCAB = 300


@dataclasses.dataclass
class Real:
    eng: SGLangEngine
    root: Path
    models: dict[int, torch.nn.Module]  # weight version -> the transformers model with those weights
    start_s: float

    @property
    def url(self) -> str:
        """Server 0: the one single-request tests talk to (requests go round robin from server 0)."""
        return self.eng.worker_urls[0]

    def model(self) -> torch.nn.Module:
        return self.models[self.eng.weight_version]


def log(msg: str) -> None:
    print(f"[sglang-real] {msg}", flush=True)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    python = sglang_python()  # skips here when there is no server venv
    root = tmp_path_factory.mktemp("sglang_real")
    base = real_tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    with private_netns() as how:
        t0 = time.monotonic()
        eng = SGLangEngine(SGLangConfig(**real_server_kwargs(
            root / "base", python=python, log_dir=str(root / "logs"), weight_sync="disk",
            disk_sync_dir=str(root / "sync"), num_servers=2)))  # fmt: skip
        start_s = time.monotonic() - t0
        log(f"network namespace: {how}; 2 servers (started together) healthy after {start_s:.1f} s")
        pids = [q for p in eng.server_pids for q in process_tree(p)]
        try:
            yield Real(eng, root, {0: base}, start_s)
        finally:
            pids += [q for p in eng.server_pids for q in process_tree(p)]
            eng.shutdown()
            assert pids_alive(pids) == [], f"server processes left: {pids_alive(pids)}"


def _greedy_ref(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [g[0].token_ids for g in LocalEngine(model, eos_token_ids=[EOS]).generate(prompts, 1, params)]


def _max_lp_diff(model: torch.nn.Module, samples, temperature: float) -> float:
    diffs = [0.0]
    for s in samples:
        ref = teacher_forced_logprobs(model, [s.prompt_ids + s.token_ids], [len(s.prompt_ids)], temperature)[0]
        assert len(ref) == len(s.logprobs)
        diffs += [abs(a - b) for a, b in zip(s.logprobs, ref)]
    return max(diffs)


def test_launch_mode_runs_the_configured_interpreter(real):
    """rollout.sglang.python: the server runs in its own venv, not the trainer's interpreter."""
    cmdline = Path(f"/proc/{real.eng.server_pids[0]}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].decode() == real.eng.cfg.python != os.path.realpath(sys.executable)
    assert cmdline[1:3] == [b"-m", b"sglang.launch_server"]
    info = requests.get(real.url + "/server_info", timeout=30).json()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert real.url.startswith("http://127.0.0.1:")
    assert real.eng.vocab_size == VOCAB and real.eng.max_context_len == 1024  # from model_path/config.json


def test_generate_n_logprobs_greedy_score(real):
    eng = real.eng
    eng.cfg.max_batch_per_request = 5  # 12 rows -> 3 requests
    try:
        out = eng.generate(PROMPTS[:3], 4, SamplingParams(max_new_tokens=16, temperature=1.0))
    finally:
        eng.cfg.max_batch_per_request = 256
    assert [len(g) for g in out] == [4, 4, 4]
    flat = [s for g in out for s in g]
    assert all(s.prompt_ids == p for p, g in zip(PROMPTS, out) for s in g)
    assert all(s.weight_version == eng.weight_version for s in flat)
    assert any(len({tuple(s.token_ids) for s in g}) > 1 for g in out)  # n samples, not n copies
    d_sampled = _max_lp_diff(real.model(), flat, 1.0)
    out_t = eng.generate(PROMPTS[:2], 2, SamplingParams(max_new_tokens=16, temperature=0.7))
    d_temp = _max_lp_diff(real.model(), [s for g in out_t for s in g], 0.7)
    greedy = eng.generate(PROMPTS, 2, GREEDY)
    assert [[s.token_ids for s in g] for g in greedy] == [[r, r] for r in _greedy_ref(real.model(), PROMPTS)]
    d_greedy = _max_lp_diff(real.model(), [g[0] for g in greedy], 1.0)
    seqs, pls = make_check_sequences(VOCAB, num=3, seq_len=16, avoid_ids=(0, 1, 2))
    m = check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(real.model(), a, b, t), seqs, pls, 1e-4)
    log(f"log-prob max |server - transformers|: sampled T=1 {d_sampled:.2e}, T=0.7 {d_temp:.2e}, "
        f"greedy {d_greedy:.2e}, prompt scoring {m['rollout_logprob_abs_diff_max']:.2e}")
    assert max(d_sampled, d_temp, d_greedy) < 1e-4


def test_finish_reasons_stop_length(real):
    eng = real.eng
    ref = eng.generate(PROMPTS[:1], 1, GREEDY)[0][0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == GREEDY.max_new_tokens
    # stop token id: the 5th greedy token ends the sample and is included
    stop_id = ref.token_ids[4]
    k = ref.token_ids.index(stop_id)
    s = eng.generate(PROMPTS[:1], 1, dataclasses.replace(GREEDY, stop_token_ids=[stop_id]))[0][0]
    assert s.finish_reason == "stop" and s.token_ids == ref.token_ids[: k + 1] and s.matched_stop == stop_id
    # stop string: text trimmed before it (no_stop_trim=false), the completing token included
    text = ref.text
    stop = next(text[i : i + 2] for i in range(len(text) // 3, len(text) - 2) if text[i : i + 2].isascii()
                and text[i : i + 2].isalnum())  # fmt: skip
    s = eng.generate(PROMPTS[:1], 1, dataclasses.replace(GREEDY, stop=[stop]))[0][0]
    assert s.finish_reason == "stop" and s.matched_stop == stop and s.text == text[: text.index(stop)], (s, stop)
    assert s.token_ids == ref.token_ids[: len(s.token_ids)] and len(s.token_ids) < len(ref.token_ids)
    # unknown sampling keys: this SGLang build answers 500 (not the 400 of 0.5.23), our engine never sends them
    r = requests.post(real.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 3}})
    assert r.status_code in (400, 500)


def _sync_with_rows_in_flight(real: Real, mode: str, seed: int) -> None:
    eng = real.eng
    old_v, old = eng.weight_version, real.model()
    new = real_tiny_llama(seed=seed)
    v = old_v + 1
    eng.cfg.weight_sync, eng.cfg.weight_bucket_mb = mode, 0.05  # 50 KB buckets: several requests
    res: list = []
    th = threading.Thread(target=lambda: res.append(eng.generate(PROMPTS[:2], 2, IN_FLIGHT)))
    th.start()
    time.sleep(0.6)
    t0 = time.monotonic()
    eng.update_weights(iter(list(new.state_dict().items())), v)
    sync_s = time.monotonic() - t0
    th.join(timeout=120)
    real.models[v] = new
    inflight = [s for g in res[0] for s in g]
    kinds = sorted({s.finish_reason for s in inflight})
    assert "abort" in kinds and set(kinds) <= {"abort", "stop"}, kinds
    assert all(s.weight_version == old_v for s in inflight)
    assert all(len(s.token_ids) == len(s.logprobs) < 700 for s in inflight if s.finish_reason == "abort")
    assert _max_lp_diff(old, inflight, 1.0) < 1e-4  # aborted rows: valid log-probs of the old weights
    info = requests.get(real.url + "/model_info", timeout=30).json()
    assert info["weight_version"] == str(v) and eng.weight_version == v
    after = eng.generate(PROMPTS, 1, GREEDY)
    assert [g[0].token_ids for g in after] == _greedy_ref(new, PROMPTS) != _greedy_ref(old, PROMPTS)
    assert all(g[0].weight_version == v for g in after)
    seqs, pls = make_check_sequences(VOCAB, num=2, seq_len=12, avoid_ids=(0, 1, 2))
    m = check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(new, a, b, t), seqs, pls, 1e-4)
    with pytest.raises(LogprobMismatchError, match=r"max \|engine - trainer\|"):
        check_logprobs(eng, lambda a, b, t: teacher_forced_logprobs(old, a, b, t), seqs, pls, 1e-4)
    log(f"{mode} sync to v{v}: {sync_s:.2f} s with {len(inflight)} rows in flight ({kinds}); "
        f"post-sync check max diff {m['rollout_logprob_abs_diff_max']:.2e}")
    if mode == "disk":
        assert sorted(p.name for p in (real.root / "sync").iterdir()) == [f"weights_v{v}"]


def test_weight_sync_disk_and_distributed_with_requests_in_flight(real):
    """pause(abort) -> update -> flush_cache -> continue: in-flight rows come back marked "abort" with the log-probs
    of the old weights; later rows carry the new version and match transformers on the new weights."""
    _sync_with_rows_in_flight(real, "disk", 9)
    _sync_with_rows_in_flight(real, "distributed", 10)
    assert real.eng._pg is not None  # the gloo weight-update group stays up for the next distributed sync


def test_version_check_catches_a_server_on_another_version(real, monkeypatch):
    eng = real.eng
    eng.cfg.weight_sync = "disk"
    v = eng.weight_version + 1
    real_sync = SGLangEngine._sync_disk

    def sync_then_someone_else_sets_version(self, named_tensors, version):
        real_sync(self, named_tensors, version)
        requests.post(real.url + "/update_weight_version", json={"new_version": "77"}, timeout=30)

    monkeypatch.setattr(SGLangEngine, "_sync_disk", sync_then_someone_else_sets_version)
    new = real_tiny_llama(seed=11)
    with pytest.raises(WeightSyncError, match=f"{real.url}: weight_version is '77' after sync, expected '{v}'"):
        eng.update_weights(list(new.state_dict().items()), v)
    monkeypatch.undo()
    eng.update_weights(list(new.state_dict().items()), v)  # a clean sync fixes it
    real.models[v] = new
    assert requests.get(real.url + "/model_info", timeout=30).json()["weight_version"] == str(v)


def test_killed_server_retries_then_names_url_restart_restores_weights(real):
    """Killed mid-rollout: retries with backoff, then an error naming the URL; the live disk checkpoint stays; the
    restarted server is brought to the current weights before it serves."""
    eng = real.eng
    eng.cfg.weight_sync = "disk"
    v = eng.weight_version
    live = real.root / "sync" / f"weights_v{v}"
    assert (live / "model.safetensors.index.json").exists()  # 50 KB shards (convert.hf_io.write_safetensors)
    errors: list[BaseException] = []

    def rollout() -> None:
        try:
            # greedy rows never reach EOS on this model, so they are surely running when the server is killed
            eng.generate(PROMPTS[:2], 2, IN_FLIGHT)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    th = threading.Thread(target=rollout)
    t0 = time.monotonic()
    th.start()
    time.sleep(0.6)
    pid = eng.server_pids[0]
    for p in process_tree(pid):  # a crash: SIGKILL, no graceful exit
        os.kill(p, signal.SIGKILL)
    th.join(timeout=60)
    fail_s = time.monotonic() - t0
    assert len(errors) == 1 and isinstance(errors[0], RolloutServerError), errors
    msg = str(errors[0])
    assert msg.startswith(f"{real.url}/generate: failed after 3 attempt(s): connection failed"), msg
    assert fail_s >= 0.6 + 0.2 + 0.4  # backoff 0.2 s, 0.4 s
    assert not eng.health()
    # the live checkpoint is intact: the kill did not touch it
    assert sorted(p.name for p in (real.root / "sync").iterdir()) == [f"weights_v{v}"]
    assert (live / "config.json").exists() and list(live.glob("*.safetensors"))
    # restart on the same port (as a supervisor would): the engine reloads weights_v{v} before anything is served
    t0 = time.monotonic()
    eng.restart(0)
    restart_s = time.monotonic() - t0
    assert requests.get(real.url + "/model_info", timeout=30).json()["weight_version"] == str(v)
    out = eng.generate(PROMPTS, 1, GREEDY)
    assert [g[0].token_ids for g in out] == _greedy_ref(real.model(), PROMPTS)
    assert all(g[0].weight_version == v for g in out)
    log(f"kill -> error after {fail_s:.2f} s; restart + restore to v{v}: {restart_s:.1f} s")
    # a server changed behind the engine's back (here: reloaded from the base checkpoint) is restored by generate()
    r = requests.post(real.url + "/update_weights_from_disk", timeout=60,
                      json={"model_path": str(real.root / "base"), "weight_version": "default"})
    assert r.json()["success"]
    out = eng.generate(PROMPTS, 1, GREEDY)
    assert [g[0].token_ids for g in out] == _greedy_ref(real.model(), PROMPTS)
    # the restarted server joins a fresh gloo weight-update group: a distributed sync reaches both servers
    new = real_tiny_llama(seed=13)
    eng.cfg.weight_sync = "distributed"
    eng.update_weights(list(new.state_dict().items()), v + 1)
    for u in eng.worker_urls:
        assert requests.get(u + "/model_info", timeout=30).json()["weight_version"] == str(v + 1)
    assert [g[0].token_ids for g in eng.generate(PROMPTS, 1, GREEDY)] == _greedy_ref(new, PROMPTS)
    eng.cfg.weight_sync = "disk"  # back to a disk copy of the live version for the tests that follow
    eng.update_weights(list(new.state_dict().items()), v + 2)
    real.models[v + 1] = real.models[v + 2] = new
    # without a disk copy (tensor/distributed sync) a stale server is refused, naming it
    attach = SGLangEngine(dataclasses.replace(eng.cfg, weight_sync="distributed", model_path=None), [real.url],
                          vocab_size=VOCAB)
    attach.weight_version = v + 5
    with pytest.raises(WeightSyncError,
                       match=f"{real.url}: server runs weight version '{v + 2}', the engine is on {v + 5}"):
        attach.generate(PROMPTS, 1, GREEDY)


@pytest.mark.skipif(not router_available(), reason="sglang-router is not installed in the server venv")
def test_two_servers_behind_sglang_router(real):
    """Generation through sglang-router (its /generate, round robin), weight sync to each worker directly."""
    port = free_port()
    router_log = open(real.root / "router.log", "wb")  # noqa: SIM115 - closed below
    router = subprocess.Popen(
        [real.eng.cfg.python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
         "--worker-urls", *real.eng.worker_urls, "--policy", "round_robin"],
        stdout=router_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        cfg = dataclasses.replace(real.eng.cfg, router_url=url, weight_sync="disk", max_batch_per_request=2,
                                  disk_sync_dir=str(real.root / "sync_router"), num_servers=1)
        eng = SGLangEngine(cfg, list(real.eng.worker_urls), vocab_size=VOCAB)  # waits for the router's /health
        assert eng.gen_urls == [url] and eng._procs == []
        # this engine starts at version 0: both servers (on the module's version) are restored to the base weights
        out = eng.generate(PROMPTS, 1, GREEDY)
        assert [g[0].token_ids for g in out] == _greedy_ref(real.models[0], PROMPTS)
        new = real_tiny_llama(seed=12)
        eng.update_weights(list(new.state_dict().items()), 1)
        for u in eng.worker_urls:
            assert requests.get(u + "/model_info", timeout=30).json()["weight_version"] == "1"
        before = _prefill_batches(real)
        out = eng.generate(PROMPTS, 2, GREEDY)  # 8 rows in 4 requests through the router
        assert [[s.token_ids for s in g] for g in out] == [[r, r] for r in _greedy_ref(new, PROMPTS)]
        assert all(s.weight_version == 1 for g in out for s in g)
        served = [a - b for a, b in zip(_prefill_batches(real), before)]
        log(f"sglang-router: prefill batches per worker for 4 requests (server logs): {served}")
        assert all(n > 0 for n in served), served  # round robin: both workers served
    finally:
        os.killpg(router.pid, signal.SIGTERM)
        try:
            router.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(router.pid, signal.SIGKILL)
            router.wait()
        router_log.close()
    # the servers are on the router engine's version 1: the module engine restores its current weights
    real.eng.ensure_current_weights()
    assert [g[0].token_ids for g in real.eng.generate(PROMPTS, 1, GREEDY)] == _greedy_ref(real.model(), PROMPTS)


def _prefill_batches(real: Real) -> list[int]:
    """Per launched server: "Prefill batch" lines in its log so far (SGLang logs one per prefill)."""
    return [(real.root / "logs" / f"sglang_{i}.log").read_text(errors="replace").count("Prefill batch")
            for i in range(len(real.eng.worker_urls))]


def test_launched_server_that_exits_is_reported(real, tmp_path):
    cfg = SGLangConfig(**real_server_kwargs(real.root / "base", log_dir=str(tmp_path), extra_args=["--bogus-flag"]))
    with pytest.raises(RolloutServerError, match=r"sglang.launch_server exited with code 2(.|\n)*--bogus-flag"):
        SGLangEngine(cfg)
