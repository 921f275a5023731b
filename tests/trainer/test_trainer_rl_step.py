"""One RL step per method on real Megatron (TP=1, then TP=2 on 2 gloo ranks) with the LocalEngine.

The verifier is replaced by a deterministic stub (a sample is "correct" when its token count is even):
a random tiny model never solves the task, and all-wrong groups would give every method zero
advantages. With mixed groups every method must move the weights, the engine must match the trainer
after the weight sync (post-sync check), and TP=2 must reproduce TP=1's rewards and losses.
"""

from __future__ import annotations

import json
import math

import pytest
from trainer_tiny import TINY_RL, parity_correct, run_tp1_and_tp2

METHODS = ["scpo", "grpo", "global_length_penalty", "calibration", "lapo_stage1", "lapo_stage2"]


def _cfg(tp: int):
    from megatron_scpo.config import load_config

    return load_config(None, [
        *TINY_RL, "name=rlstep", f"parallel.tp={tp}", "algo.clip.adaptive=true", "algo.lapo.default_budget=20",
    ])


def _worker(rank: int, world: int, out_path: str, run_dir: str) -> None:
    import torch

    import megatron_scpo.data.answers as answers
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    answers.is_correct = parity_correct  # mixed groups, deterministic
    cfg = _cfg(tp=world)
    rt = build_runtime(cfg, __import__("pathlib").Path(run_dir))
    records = PromptIterator(load_split(cfg.data, "train"), seed=0).next_batch(cfg.rl.prompts_per_step)
    start = [p.detach().clone() for p in rt.policy.modules()[0].parameters()]
    results = {}
    for name in METHODS:
        method = method_for(cfg, name)
        m = rl_step(rt, method, records, step=0, seed=77)
        moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(rt.policy.modules()[0].parameters(), start))
        results[name] = {k: m[k] for k in ("reward/mean", "loss", "acc/mean", "length/mean", "clip/frac_low",
                                           "grad_norm", "rollout_logprob_abs_diff") if k in m}
        results[name]["moved"] = moved
        results[name]["importance"] = m.get("importance/responses", 0.0)
        # every method starts from the same weights: reload the initial ones (engine too)
        with torch.no_grad():
            for p, s in zip(rt.policy.modules()[0].parameters(), start):
                p.copy_(s)
        rt.policy.optimizer.reload_model_params()
        rt.sync_weights()
    results["kl"] = _kl_steps(rt, cfg, records, start)
    # A NaN loss (here: NaN logits injected in the training forward only) skips the step and is logged.
    poison = {"on": False}

    def nan_logits(_mod, _inp, out):
        if not poison["on"]:
            return out
        logits, bias = out if isinstance(out, tuple) else (out, None)
        logits = logits * float("nan")
        return (logits, bias) if isinstance(out, tuple) else logits

    handle = rt.policy.modules()[0].output_layer.register_forward_hook(nan_logits)
    real_train_step = rt.policy.train_step

    def poisoned_train_step(*a, **k):
        poison["on"] = True
        try:
            return real_train_step(*a, **k)
        finally:
            poison["on"] = False

    rt.policy.train_step = poisoned_train_step
    m = rl_step(rt, method_for(cfg, "grpo"), records, step=1, seed=78)
    handle.remove()
    rec = rt.logger.log("rl/grpo", 1, m)
    moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(rt.policy.modules()[0].parameters(), start))
    results["nan"] = {"skipped": m.get("nan_loss_skipped", 0.0), "moved": moved, "logged_loss": rec.get("loss", "x"),
                      "nonfinite": rec.get("nonfinite_metrics", 0)}
    results["stop"] = _stop_agreement(rank, world, __import__("pathlib").Path(run_dir) / "STOP")
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def _kl_steps(rt, cfg, records, start) -> dict:
    """Two GRPO steps with the k3 KL to the frozen start weights: 0 while policy == reference, > 0 after."""
    import dataclasses

    import torch

    from megatron_scpo.trainer.batching import pad_batch
    from megatron_scpo.trainer.reference import ReferencePolicy
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import method_for

    algo = dataclasses.replace(cfg.algo, loss=dataclasses.replace(cfg.algo.loss, kl_coef=0.5))
    rt.cfg = dataclasses.replace(cfg, algo=algo, rl=dataclasses.replace(cfg.rl, mini_batches=1))
    rt.reference = ref = ReferencePolicy.from_live(rt.policy)
    method = method_for(rt.cfg, "grpo")
    m1 = rl_step(rt, method, records, step=0, seed=77)
    m2 = rl_step(rt, method, records, step=1, seed=78)
    # the swap leaves the trained weights live and the reference frozen at the start weights
    params = list(rt.policy.modules()[0].parameters())
    moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(params, start))
    packed = pad_batch([[1, 5, 6, 7]], [[8, 9, 10]], rt.pad_id)
    live = rt.logprobs(packed, 1.0)
    ref_lp = ref.logprobs(rt, packed, 1.0)
    assert torch.equal(live, rt.logprobs(packed, 1.0)), "reference swap did not restore the live weights"
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    assert torch.equal(ref_lp, rt.logprobs(packed, 1.0)), "reference is not the start weights"
    rt.policy.optimizer.reload_model_params()
    rt.sync_weights()
    rt.cfg = cfg
    rt.reference = None
    return {"kl1": m1["kl/mean"], "kl2": m2["kl/mean"], "loss1": m1["loss"], "moved": moved,
            "has_time": "time/ref_logprob" in m1, "ref_diff": float((live - ref_lp).abs().max())}


def _stop_agreement(rank: int, world: int, stop_file) -> list[bool]:
    """Every rank gets the same stop decision whichever rank saw the request (collective poll)."""
    from megatron_scpo.trainer.preempt import StopRequest

    seen = []
    for case in ("none", "rank1_sigterm", "rank0_file"):
        s = StopRequest(rank, stop_file=stop_file)
        if case == "rank1_sigterm" and rank == 1:
            s.signalled = True
        if case == "rank0_file" and rank == 0:
            stop_file.touch()
        seen.append(s.poll())
        if rank == 0:
            stop_file.unlink(missing_ok=True)
        expect = case == "rank0_file" or (case == "rank1_sigterm" and world > 1)
        assert seen[-1] == expect, (rank, case, seen)
    return seen


@pytest.mark.distributed
def test_rl_step_every_method_tp1_and_tp2(tmp_path):
    res = run_tp1_and_tp2(_worker, tmp_path)
    for name in METHODS:
        r1, r2 = res[1][name], res[2][name]
        assert 0.0 < r1["acc/mean"] < 1.0, name  # the stub gives mixed groups
        assert math.isfinite(r1["loss"]) and r1["grad_norm"] > 0, (name, r1)
        assert r1["moved"] > 0, f"{name}: the optimizer step did not change the weights"
        assert r1["rollout_logprob_abs_diff"] < 1e-3, (name, r1)  # engine runs the trainer's new weights
        # TP=2 sees the same rollouts (rank 0's engine, same seed) and computes the same loss
        for k in ("reward/mean", "acc/mean", "length/mean"):
            assert r1[k] == pytest.approx(r2[k], abs=1e-6), (name, k, r1[k], r2[k])
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-3, abs=1e-5), (name, r1["loss"], r2["loss"])
    assert res[1]["scpo"]["importance"] > 0  # SCPO scored the importance of its correct responses
    for world in (1, 2):
        nan = res[world]["nan"]
        assert nan["skipped"] == 1.0 and nan["moved"] == 0.0, nan  # optimizer step skipped, weights untouched
        assert nan["logged_loss"] is None and nan["nonfinite"] >= 1, nan  # logged as non-finite, not dropped
        assert res[world]["stop"] == [False, world > 1, True]
        kl = res[world]["kl"]
        assert abs(kl["kl1"]) < 1e-9 and kl["kl2"] > 1e-7 and math.isfinite(kl["loss1"]), kl  # policy == ref first
        assert kl["moved"] > 0 and kl["ref_diff"] > 0 and kl["has_time"], kl
    assert res[1]["kl"]["kl2"] == pytest.approx(res[2]["kl"]["kl2"], rel=1e-2), (res[1]["kl"], res[2]["kl"])
