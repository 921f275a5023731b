"""rollouts.py's Rollouts record (collection itself is tested with a scripted engine in test_trainer_verify.py)."""

from __future__ import annotations

from megatron_scpo.trainer.rollouts import Rollouts, rollout_stats


def _rollouts(reasons: list[str], groups: list[int]) -> Rollouts:
    n = len(reasons)
    return Rollouts(prompt_ids=[[1]] * n, response_ids=[[5] * (i + 1) for i in range(n)],
                    rollout_logprobs=[[0.0] * (i + 1) for i in range(n)], texts=[str(i) for i in range(n)],
                    correct=[i % 2 == 0 for i in range(n)], group_ids=groups, prompt_keys=[f"p{g}" for g in groups],
                    golds=["0"] * n, problems=["q"] * n, difficulty=[None] * n, offsets=[[]] * n,
                    finish_reasons=reasons)


def test_truncated_is_derived_from_finish_reasons():
    r = _rollouts(["stop", "length", "abort", "length"], [0, 0, 1, 1])
    assert r.truncated == [False, True, False, True]
    sub = r.select([3, 0])  # selection and concatenation keep it consistent: there is no second copy
    assert sub.truncated == [True, False] and sub.group_ids == [0, 1]
    sub.extend(r.select([1], group_offset=2))
    assert sub.truncated == [True, False, True] and sub.finish_reasons == ["length", "stop", "length"]


def test_rollout_stats_by_hand():
    r = _rollouts(["stop", "length", "stop", "length"], [0, 0, 1, 1])  # lengths 1, 2, 3, 4; correct 0 and 2
    m = rollout_stats(r, rollout_seconds=2.0)
    assert m["length/mean"] == 2.5 and m["length/max"] == 4.0 and m["length/truncated_frac"] == 0.5
    assert m["acc/mean"] == 0.5 and m["perf/tokens_per_s"] == 5.0 and m["perf/samples"] == 4.0
    assert m["length/p50"] == 2.5 and abs(m["length/p90"] - 3.7) < 1e-12  # linear interpolation
