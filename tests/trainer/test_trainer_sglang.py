"""RL steps with ``rollout.engine=sglang`` end to end: against a real SGLang server and against the stand-in.

Real server (``test_rl_steps_against_real_sglang``): one SGLang CPU server per module (the server venv,
tests/rollout/sglang_real.py, inside a private network namespace with the trainer ranks), two RL steps at TP=1
and then TP=2: step 0 syncs by ``disk``, step 1 by ``distributed`` (gloo). Checked: rollouts come from the
previous sync's version, the server's sample log-probs equal Megatron's recompute, the post-sync check passes,
the server reports the new version, and its greedy output equals ``transformers.generate`` on the trainer's
exported weights. The TP=2 run attaches to the server still holding the TP=1 run's weights: the engine restores
the run's start checkpoint before its first rollout.

Stand-in (``test_rl_steps_against_sglang_standin``, tests/rollout/sglang_standin.py): only what the real
server cannot do here, ``weight_sync: tensor`` (it kills a CPU server over HTTP), with the request log to
check the documented sync order and the per-row seeds. The stand-in samples a transformers copy of the run's
initial checkpoint, in-process on rank 0 (so it can open the shared-memory handles); rank 1 only walks the
collective export. Step 0 of TP=1 and TP=2 sees the same server rollouts and computes the same loss. Metrics
are not compared with a ``rollout.engine=local`` run: the stand-in seeds each row (``sampling_seed``) while
LocalEngine seeds one generator per call, so the same seed gives different (equally valid) samples.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from trainer_tiny import TINY_RL, parity_correct, run_tp1_and_tp2

HERE = Path(__file__).parent
SYNC_SEQUENCE = ["/pause_generation", "/update_weights_from_tensor", "/update_weight_version", "/flush_cache",
                 "/continue_generation", "/model_info"]


def _cfg(url: str, disk_dir: str):
    from megatron_scpo.config import load_config

    return load_config(None, [
        *TINY_RL, "name=rlsglang", "parallel.tp=1", "rollout.engine=sglang", f"rollout.sglang_urls=[{url}]",
        "rollout.sglang.weight_sync=tensor", f"rollout.sglang.disk_sync_dir={disk_dir}",
        "rollout.sglang.weight_bucket_mb=0.05", "rollout.sglang.max_batch_per_request=5",
        "rollout.sglang.max_retries=1", "rollout.sglang.retry_backoff_s=0.05",
        "rollout.sglang.request_timeout_s=60", "rollout.sglang.startup_timeout_s=10",
    ])


def _paths_since(server, start: int) -> list[str]:
    return [p for p, _ in server.requests[start:]]


def _sampling_rows(body: dict) -> list[dict]:
    """Per-row sampling params of a /generate body (a list per row, or one dict for all rows)."""
    sp = body.get("sampling_params") or {}
    return sp if isinstance(sp, list) else [sp] * len(body["input_ids"])


def _greedy_vs_reference(rt, records, ref, res: dict) -> None:
    """Greedy rollouts of the engine vs transformers.generate on the same weights (an independent decode), 16 tokens."""
    import torch

    from megatron_scpo.rollout.base import SamplingParams

    prompts = [rt.encode_prompt(r.problem) for r in records]
    greedy = rt.engine.generate(prompts, 1, SamplingParams(max_new_tokens=16, temperature=0.0,
                                                           stop_token_ids=[rt.eos_id]))
    res["greedy_versions"] = sorted({g[0].weight_version for g in greedy})
    res["greedy"], res["greedy_ref"] = [g[0].token_ids for g in greedy], []
    for p in prompts:
        with torch.no_grad():
            full = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                eos_token_id=rt.eos_id, pad_token_id=rt.pad_id)[0, len(p):].tolist()
        res["greedy_ref"].append(full[: full.index(rt.eos_id) + 1] if rt.eos_id in full else full)


def _worker(rank: int, world: int, out_path: str, run_dir: str) -> None:
    """TP=``world``; rank 0 hosts the stand-in and owns the engine, every rank trains and exports."""

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE.parent / "rollout"))
    from sglang_standin import SGLangStandin

    import megatron_scpo.data.answers as answers
    from megatron_scpo.backend.parallel import barrier, broadcast_object
    from megatron_scpo.convert.live import iter_hf_tensors
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.data.tokenizer import load_tokenizer
    from megatron_scpo.rollout.local import LocalEngine
    from megatron_scpo.rollout.sglang import bucket_named_tensors
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import _model_source, _write_tiny_model, build_runtime, method_for, quiet_warnings

    quiet_warnings()
    answers.is_correct = parity_correct  # mixed groups, deterministic
    run = Path(run_dir)
    # The server must exist before the runtime attaches: write the run's initial checkpoint first (build_runtime
    # then finds it and loads the same weights into Megatron).
    probe = _cfg("http://127.0.0.1:1", str(run / "sync"))
    hf_dir, _, tok = _model_source(probe, run)
    server = None
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        _write_tiny_model(probe, hf_dir, tok)
        server = SGLangStandin(LocalEngine.from_pretrained(hf_dir, tokenizer=load_tokenizer(hf_dir)),
                               model_path=str(hf_dir)).start()
    barrier()
    url = broadcast_object(server.url if server is not None else None)
    res: dict = {}
    try:
        cfg = _cfg(url, str(run / "sync"))
        rt = build_runtime(cfg, run)
        records = PromptIterator(load_split(cfg.data, "train"), seed=0).next_batch(cfg.rl.prompts_per_step)
        method = method_for(cfg, "grpo")
        calls: list = []
        if rank == 0:
            assert type(rt.engine).__name__ == "SGLangEngine", type(rt.engine)
            real_generate = rt.engine.generate

            def recording_generate(prompts, n, params):
                out = real_generate(prompts, n, params)
                calls.append((prompts, n, params, out))
                return out

            rt.engine.generate = recording_generate
        else:
            assert rt.engine is None
        start = [p.detach().clone() for p in rt.policy.modules()[0].parameters()]
        steps = []
        for step in range(2):
            mode = "tensor"
            if rank == 0:
                n_req = len(server.requests)
            m = rl_step(rt, method, records, step=step, seed=77 + step)
            rec = {"mode": mode, "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}
            steps.append(rec)
            if rank != 0:
                continue
            paths = _paths_since(server, n_req)
            gen_bodies = [b for p, b in server.requests[n_req:] if p == "/generate"
                          and _sampling_rows(b)[0].get("max_new_tokens", 0) > 0]
            first_sync = paths.index("/pause_generation")
            sync_paths = [p for p in paths[first_sync:] if p != "/generate"]  # /generate after = post-sync check
            prompts, n, params, out = calls[-1]
            rec.update({
                "gen_rows": sum(len(b["input_ids"]) for b in gen_bodies), "n": n, "prompts": len(prompts),
                "seeds": sorted(sp["sampling_seed"] for b in gen_bodies for sp in _sampling_rows(b)),
                "param_seed": params.seed, "sample_versions": sorted({s.weight_version for g in out for s in g}),
                "sync_paths": [p for i, p in enumerate(sync_paths) if i == 0 or p != sync_paths[i - 1]],
                "n_updates": sum(p.startswith("/update_weights_from_") for p in sync_paths),
                "gen_before_sync": "/generate" in paths[:first_sync], "server_version": server.weight_version,
            })
        res["steps"] = steps
        exported = dict(iter_hf_tensors(rt.policy.modules(), rt.hf_config))  # collective
        moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(rt.policy.modules()[0].parameters(), start))
        res["moved"] = moved
        if rank == 0:
            # the server now holds exactly the trainer's weights (HF names; tied lm_head is not exported)
            served = server.engine.model.state_dict()
            res["weights_max_diff"] = max(float((served[k] - t).abs().max()) for k, t in exported.items())
            res["weights_names_ok"] = set(exported) <= set(served)
            # greedy: the server vs transformers.generate on the trainer's exported weights (independent decode)
            ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
            missing, unexpected = ref.load_state_dict(exported, strict=False)
            res["ref_load"] = {"missing": sorted(missing), "unexpected": sorted(unexpected)}
            ref.eval()
            _greedy_vs_reference(rt, records, ref, res)
            res["n_buckets"] = len(list(bucket_named_tensors(exported.items(), int(0.05 * 2**20))))
            rt.engine.shutdown()
    finally:
        if server is not None:
            server.stop()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)


def _check_run(res: dict, world: int) -> None:
    rows = 3 * 4  # rl.prompts_per_step x rollout.n_samples
    for i, s in enumerate(res["steps"]):
        m = s["metrics"]
        # rollouts: one generate call per step, served over HTTP, every row with its own seed
        assert s["prompts"] == 3 and s["n"] == 4 and s["gen_rows"] == rows, s
        assert s["gen_before_sync"]
        assert s["seeds"] == list(range(s["param_seed"], s["param_seed"] + rows)), s
        # samples come from the weights of the previous sync (step 0: the start checkpoint, version 0)
        assert s["sample_versions"] == [i], s
        # the server's sample log-probs are the trainer's own log-probs of those samples (same weights)
        assert m["train_rollout_logprob_abs_diff"] < 1e-4, (world, m)
        # the sync went through the configured method, in the documented order, to the new version
        assert s["sync_paths"][:-1] == SYNC_SEQUENCE[:-1], s  # (repeated bucket requests collapsed)
        assert s["sync_paths"][-1] == "/model_info", s  # the version check (then the generate-time check)
        assert s["n_updates"] == res["n_buckets"], (s, res["n_buckets"])
        assert s["server_version"] == str(i + 1) and m["weight_version"] == i + 1, s
        # post-sync check: server and trainer score the same sequences after the update
        assert 0 <= m["rollout_logprob_abs_diff"] < 1e-4, (world, m)
        assert m["grad_norm"] > 0 and 0 < m["acc/mean"] < 1, m
    assert res["moved"] > 0
    assert res["weights_names_ok"] and res["weights_max_diff"] == 0.0, res
    assert res["n_buckets"] > 1  # 50 KB buckets: the tensor sync sent several requests
    assert res["ref_load"]["unexpected"] == [] and set(res["ref_load"]["missing"]) <= {"lm_head.weight"}, res
    assert res["greedy_versions"] == [2] and all(len(g) > 1 for g in res["greedy"]), res
    assert res["greedy"] == res["greedy_ref"], (world, res["greedy"], res["greedy_ref"])


@pytest.mark.distributed
def test_rl_steps_against_sglang_standin(tmp_path):
    res = run_tp1_and_tp2(_worker, tmp_path)
    for world in (1, 2):
        _check_run(res[world], world)
    # TP=2 attaches the same way: step 0 sees the same server rollouts (same start weights, same row seeds)
    m1, m2 = res[1]["steps"][0]["metrics"], res[2]["steps"][0]["metrics"]
    for k in ("reward/mean", "acc/mean", "length/mean"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-6), (k, m1[k], m2[k])
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-3, abs=1e-5), (m1["loss"], m2["loss"])


# ----------------------------------------------------------------------------------------- real SGLang server
sys.path.insert(0, str(HERE.parent / "rollout"))
from sglang_real import private_netns, real_server_kwargs, sglang_python  # noqa: E402

# The tiny model with head_dim 64 (SGLang's CPU backend; 2 KV heads so that TP=2 splits them).
REAL_MODEL = ["tiny_model.hidden_size=128", "tiny_model.num_attention_heads=2", "tiny_model.head_dim=64",
              "tiny_model.num_key_value_heads=2", "tiny_model.intermediate_size=256"]  # fmt: skip


def _real_cfg(url: str, disk_dir: str):
    from megatron_scpo.config import load_config

    return load_config(None, [
        *TINY_RL, *REAL_MODEL, "name=rlsglang_real", "parallel.tp=1", "rollout.engine=sglang",
        f"rollout.sglang_urls=[{url}]", "rollout.sglang.weight_sync=disk", f"rollout.sglang.disk_sync_dir={disk_dir}",
        "rollout.sglang.sync_backend=gloo", "rollout.sglang.weight_bucket_mb=0.05",
        "rollout.sglang.max_retries=1", "rollout.sglang.retry_backoff_s=0.05",
        "rollout.sglang.request_timeout_s=120", "rollout.sglang.startup_timeout_s=30",
    ])


def _real_worker(rank: int, world: int, out_path: str, run_dir: str, url: str) -> None:
    """TP=``world`` trainer attached to the module's real server: step 0 syncs by disk, step 1 by distributed."""
    import dataclasses

    import requests
    import torch
    from transformers import AutoModelForCausalLM

    import megatron_scpo.data.answers as answers
    from megatron_scpo.convert.live import iter_hf_tensors
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    answers.is_correct = parity_correct  # mixed groups, deterministic
    run = Path(run_dir)
    cfg = _real_cfg(url, str(run / "sync"))
    rt = build_runtime(cfg, run)  # the run's init_model was written by the test (the server may serve another)
    records = PromptIterator(load_split(cfg.data, "train"), seed=0).next_batch(cfg.rl.prompts_per_step)
    method = method_for(cfg, "grpo")
    calls: list = []
    if rank == 0:
        real_generate = rt.engine.generate

        def recording_generate(prompts, n, params):
            out = real_generate(prompts, n, params)
            calls.append(out)
            return out

        rt.engine.generate = recording_generate
    res: dict = {"steps": []}
    for step, mode in enumerate(("disk", "distributed")):
        if rank == 0:
            rt.engine.cfg = dataclasses.replace(rt.engine.cfg, weight_sync=mode)
        m = rl_step(rt, method, records, step=step, seed=77 + step)
        rec = {"mode": mode, "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}
        if rank == 0:
            rec["sample_versions"] = sorted({s.weight_version for g in calls[-1] for s in g})
            rec["server_version"] = requests.get(url + "/model_info", timeout=30).json()["weight_version"]
        res["steps"].append(rec)
    exported = dict(iter_hf_tensors(rt.policy.modules(), rt.hf_config))  # collective
    if rank == 0:
        ref = AutoModelForCausalLM.from_pretrained(str(rt.hf_dir), dtype=torch.float32, local_files_only=True)
        missing, unexpected = ref.load_state_dict(exported, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        ref.eval()
        _greedy_vs_reference(rt, records, ref, res)
        res["disk_dirs"] = sorted(d.name for d in (run / "sync").iterdir())
        rt.engine.shutdown()  # attached: leaves the server running, tears down the weight-update group
        with open(out_path, "w") as f:
            json.dump(res, f)


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """One real SGLang server for the module (launch mode, the server venv's python), in a private netns."""
    from megatron_scpo.rollout import SGLangConfig
    from megatron_scpo.rollout.sglang import SGLangEngine, process_tree
    from megatron_scpo.trainer.run import _model_source, _write_tiny_model

    python = sglang_python()  # skips here without the server venv
    root = tmp_path_factory.mktemp("trainer_sglang_real")
    probe = _real_cfg("http://127.0.0.1:1", str(root / "sync"))
    hf_dir, _, tok = _model_source(probe, root / "run1")
    (root / "run1").mkdir()
    _write_tiny_model(probe, hf_dir, tok)  # the same init checkpoint the TP=1 run builds
    with private_netns():
        eng = SGLangEngine(SGLangConfig(**real_server_kwargs(hf_dir, python=python, log_dir=str(root / "logs"))))
        pids = process_tree(eng.server_pids[0])
        try:
            yield root, eng.worker_urls[0], pids
        finally:
            eng.shutdown()
            from sglang_real import pids_alive

            assert pids_alive(pids) == [], pids_alive(pids)


@pytest.mark.distributed
def test_rl_steps_against_real_sglang(real_server):
    """Two RL steps at TP=1 then TP=2 against one real server (disk then gloo-distributed sync), post-sync check on.

    The TP=2 run starts from its own init checkpoint while the server still holds the TP=1 run's step-2 weights:
    SGLangEngine restores the server to the run's version-0 checkpoint before its first rollout."""
    from dist_utils import spawn

    root, url, _ = real_server
    res = {}
    for world in (1, 2):
        out = root / f"tp{world}.json"
        spawn(_real_worker, world_size=world, args=(str(out), str(root / f"run{world}"), url))
        res[world] = json.loads(out.read_text())
    for world in (1, 2):
        r = res[world]
        for i, s in enumerate(r["steps"]):
            m = s["metrics"]
            # rollouts come from the weights of the previous sync (step 0: the run's start checkpoint)
            assert s["sample_versions"] == [i], (world, s)
            # engine log-probs of its own samples vs the Megatron recompute (same weights, fp32)
            assert m["train_rollout_logprob_abs_diff"] < 1e-4, (world, m)
            # post-sync check: server and Megatron score the same sequences after the update
            assert 0 <= m["rollout_logprob_abs_diff"] < 1e-4, (world, m)
            assert s["server_version"] == str(i + 1) and m["weight_version"] == i + 1, s
            assert m["grad_norm"] > 0 and 0 < m["acc/mean"] < 1, m
            print(f"[sglang-real] TP={world} step {i} ({s['mode']} sync): |server - Megatron| log-prob max "
                  f"{m['train_rollout_logprob_abs_diff']:.2e} (rollouts), {m['rollout_logprob_abs_diff']:.2e} "
                  "(post-sync check)")
        assert r["greedy_versions"] == [2] and all(len(g) > 1 for g in r["greedy"]), r
        assert r["greedy"] == r["greedy_ref"], (world, r["greedy"], r["greedy_ref"])
        assert r["disk_dirs"] == [], r  # step 0's weights_v1 is removed once step 1 (gloo) passed its version check


def _kill_worker(rank: int, world: int, out_path: str, run_dir: str, url: str, server_pids: list[int]) -> None:
    """One RL step (disk sync), a checkpoint, then the server is SIGKILLed as the next step's rollout starts."""
    import os
    import signal
    import time

    import megatron_scpo.data.answers as answers
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.rollout.base import RolloutServerError
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    answers.is_correct = parity_correct
    run = Path(run_dir)
    cfg = _real_cfg(url, str(run / "sync"))
    rt = build_runtime(cfg, run)
    records = PromptIterator(load_split(cfg.data, "train"), seed=0).next_batch(cfg.rl.prompts_per_step)
    method = method_for(cfg, "grpo")
    m = rl_step(rt, method, records, step=0, seed=5)
    saved = rt.ckpt.save(1, {"weight_version": rt.weight_version}, rt.policy.save_shards)

    def kill() -> None:
        for p in server_pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    res: dict = {"step0_version": m["weight_version"], "saved": saved.name}
    real_generate = rt.engine.generate

    def generate_then_crash(prompts, n, params):  # the server dies as the rollout starts (timing-independent)
        kill()
        return real_generate(prompts, n, params)

    rt.engine.generate = generate_then_crash
    t0 = time.monotonic()
    try:
        rl_step(rt, method, records, step=1, seed=6)
        res["error"] = None
    except RolloutServerError as e:
        res["error"] = str(e)
    res["fail_s"] = time.monotonic() - t0
    latest = rt.ckpt.latest()
    res["latest"] = latest.name if latest else None
    res["state"] = rt.ckpt.load(latest, load_model=rt.policy.load_shards)  # loads: the checkpoint is intact
    res["disk_dirs"] = sorted(d.name for d in (run / "sync").iterdir())
    with open(out_path, "w") as f:
        json.dump(res, f)


@pytest.mark.distributed
def test_server_killed_mid_training_names_url_checkpoint_intact(real_server):
    """Runs last (it kills the module's server): the step fails after the retries with an error naming the URL;
    the checkpoint written before it loads, and the live disk-sync dir (weights_v1) is still there."""
    from dist_utils import spawn

    root, url, pids = real_server
    out = root / "kill.json"
    spawn(_kill_worker, world_size=1, args=(str(out), str(root / "run_kill"), url, pids))
    r = json.loads(out.read_text())
    assert r["step0_version"] == 1 and r["error"] is not None, r
    assert r["error"].startswith(f"{url}/") and "failed after 2 attempt(s): connection failed" in r["error"], r
    assert r["latest"] == r["saved"] == "step_000001" and r["state"]["weight_version"] == 1, r
    assert r["disk_dirs"] == ["weights_v1"], r
    print(f"[sglang-real] server killed mid-training: error after {r['fail_s']:.2f} s: {r['error'][:120]}")
