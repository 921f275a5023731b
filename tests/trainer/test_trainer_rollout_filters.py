"""Aborted samples, dynamic sampling and overlong filtering inside a real RL step, at TP=1, TP=2 and DP=2.

Rank 0's LocalEngine is wrapped so that it reports ``abort`` for chosen samples (a real server cannot be
made to abort on demand); the verifier is a deterministic stub keyed on the gold answer (gold % 3 == 0:
all right, == 2: all wrong, == 1: alternating, so mixed). The expected draws, filtered/dropped groups,
trained prompts, data position and loss tokens are computed another way: by walking the same data order
with the same rules and the engine's own record of its samples. Every layout must agree (rollouts are
generated on rank 0 and broadcast; the draw decisions read broadcast data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_utils import spawn
from trainer_tiny import TINY_RL

P, N, MAX_DRAWS = 3, 4, 3
ABORTS = {0: {1}, 1: {0, 1, 2}}  # prompt position in a round -> aborted sample indices (position 1: 1 left)


def _stub_factory():
    seen: dict[str, int] = {}

    def is_correct(text: str, gold: str, **_: object) -> bool:
        k = seen.get(gold, 0)
        seen[gold] = k + 1
        g = int(gold)
        return g % 3 == 0 or (g % 3 == 1 and k % 2 == 0)

    return is_correct


class AbortingEngine:
    """Delegates to the real engine; marks ABORTS samples ``abort`` (and even-numbered others ``stop``, as if a
    stop string had matched), and records every sample it returns."""

    def __init__(self, inner):
        self.inner, self.record = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, n, params):
        out = self.inner.generate(prompts, n, params)
        call = []
        for p, samples in enumerate(out):
            for j, s in enumerate(samples):
                if j in ABORTS.get(p, ()):
                    s.finish_reason = "abort"
                elif j % 2 == 0:  # a random tiny model rarely stops within 20 tokens: half of them "stop" here
                    s.finish_reason = "stop"
                call.append((p, j, s.finish_reason, len(s.token_ids)))
        self.record.append(call)
        return out


def _worker(rank: int, world: int, out_path: str, run_dir: str, tp: int) -> None:
    import torch.distributed as dist

    import megatron_scpo.data.answers as answers
    from megatron_scpo.config import load_config
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    answers.is_correct = _stub_factory()
    cfg = load_config(None, [*TINY_RL, "name=filters", f"parallel.tp={tp}", f"rl.prompts_per_step={P}",
                             f"rollout.n_samples={N}", "rl.dynamic_sampling=true",
                             f"rl.dynamic_sampling_max_draws={MAX_DRAWS}", "rl.overlong_filter=true"])
    rt = build_runtime(cfg, Path(run_dir))
    if rt.is_main:
        rt.engine = AbortingEngine(rt.engine)
    sent = []
    real = rt.train_step

    def train_step(batch, loss_fn, mbs):
        sent.append(int(batch.loss_mask.sum()))
        return real(batch, loss_fn, mbs)

    rt.train_step = train_step
    it = PromptIterator(load_split(cfg.data, "train"), seed=0)
    m = rl_step(rt, method_for(cfg, "grpo"), it.next_batch(P), step=0, seed=77, draw=it.next_batch)
    info = rt.policy.info
    parts = [None] * world
    dist.all_gather_object(parts, (info.tp_rank, sum(sent)))  # TP ranks of one replica see the same batch
    if rank == 0:
        keys = ("rollout/draws", "rollout/filtered_groups", "rollout/dropped_groups", "rollout/aborted",
                "rollout/groups", "rollout/overlong_filtered", "perf/samples", "acc/mean", "reward/mean", "loss")
        res = {k: m.get(k) for k in keys}
        res.update(prompt_ids=m["data/prompt_ids"], position=it.state_dict(), record=rt.engine.record,
                   tokens=sum(t for r, t in parts if r == 0))
        with open(out_path, "w") as f:
            json.dump(res, f)


def _expected(cfg_overrides: list[str], record: list) -> dict:
    """The step's decisions walked by hand over the same data order, with the engine's sample record."""
    from megatron_scpo.config import load_config
    from megatron_scpo.data.datasets import PromptIterator, load_split

    cfg = load_config(None, [*TINY_RL, *cfg_overrides])
    it = PromptIterator(load_split(cfg.data, "train"), seed=0)
    out = {"draws": 0, "filtered": 0, "dropped": 0, "aborted": 0, "drawn": [], "kept": [], "rows": 0, "tokens": 0,
           "truncated": 0}
    while len(out["kept"]) < P and out["draws"] < MAX_DRAWS:
        batch = it.next_batch(P)
        call = record[out["draws"]]
        out["draws"] += 1
        out["drawn"] += [r.id for r in batch]
        for p, rec in enumerate(batch):
            left = [(reason, n) for q, j, reason, n in call if q == p and reason != "abort"]
            out["aborted"] += N - len(left)
            if len(left) < 2:
                out["dropped"] += 1
            elif int(rec.answer) % 3 != 1:
                out["filtered"] += 1
            elif len(out["kept"]) < P:
                out["kept"].append(rec.id)
                out["rows"] += len(left)
                out["tokens"] += sum(n for reason, n in left if reason == "stop")
                out["truncated"] += sum(1 for reason, _ in left if reason == "length")
    out["position"] = it.state_dict()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_aborts_dynamic_sampling_overlong_filter_in_rl_step(tmp_path):
    res = {}
    for world, tp in ((1, 1), (2, 2), (2, 1)):  # TP=1, TP=2, DP=2
        out = tmp_path / f"w{world}tp{tp}.json"
        spawn(_worker, world_size=world, args=(str(out), str(tmp_path / f"run{world}{tp}"), tp))
        res[(world, tp)] = json.loads(out.read_text())
    r1 = res[(1, 1)]
    exp = _expected([], r1["record"])
    assert exp["kept"] and exp["tokens"] and exp["truncated"] and exp["aborted"], exp  # every filter is exercised
    assert r1["rollout/draws"] == exp["draws"] and r1["rollout/filtered_groups"] == exp["filtered"]
    assert r1["rollout/dropped_groups"] == exp["dropped"] and r1["rollout/aborted"] == exp["aborted"]
    assert r1["rollout/groups"] == len(exp["kept"]) and r1["perf/samples"] == exp["rows"]
    assert r1["rollout/overlong_filtered"] == exp["truncated"]
    assert r1["prompt_ids"] == [str(i) for i in exp["drawn"]] and r1["position"] == exp["position"]
    assert r1["tokens"] == exp["tokens"]  # loss tokens: kept, not aborted, not truncated
    for key in ((2, 2), (2, 1)):
        r = res[key]
        assert r["record"] == r1["record"], key  # same rollouts (rank 0's engine, same seeds)
        for k in ("rollout/draws", "rollout/filtered_groups", "rollout/dropped_groups", "rollout/aborted",
                  "rollout/groups", "perf/samples", "acc/mean", "reward/mean", "prompt_ids", "position"):
            assert r[k] == r1[k], (key, k, r[k], r1[k])
        assert r["tokens"] == exp["tokens"], key
        if exp["tokens"]:
            assert r["loss"] == pytest.approx(r1["loss"], rel=1e-3, abs=1e-5), key
