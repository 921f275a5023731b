"""Registry: every method end to end on a small hand-built batch; outputs finite, shapes right, state survives."""

import pytest
import torch

from megatron_scpo.algo.config import AlgoConfig
from megatron_scpo.algo.registry import GroupedRollouts, Method, build_method


def make_batch(correct, lengths, group_ids, steps_per_sample=None, T=None):
    """Each sample: `lengths[b]` response tokens split into equal-ish steps; rest is padding."""
    B = len(correct)
    T = T or max(lengths) + 2
    steps_per_sample = steps_per_sample or [1] * B
    step_ids = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        L, K = lengths[b], steps_per_sample[b]
        ids = [min(t * K // max(L, 1), K - 1) for t in range(L)]
        step_ids[b, :L] = torch.tensor(ids, dtype=torch.long)
    return GroupedRollouts(
        group_ids=torch.tensor(group_ids),
        correct=torch.tensor(correct),
        response_lengths=torch.tensor(lengths),
        step_ids=step_ids,
        response_mask=step_ids >= 0,
        truncated=torch.zeros(B, dtype=torch.bool),
        prompt_keys=[f"q{g}" for g in group_ids],
    )


def test_grpo_hand_computed():
    m = build_method(AlgoConfig(method="grpo"))
    assert isinstance(m, Method) and not m.needs_importance
    r = make_batch([True, False, False, False, True, True], [4, 6, 5, 3, 2, 2], [0, 0, 1, 1, 2, 2])
    out = m.compute(r)
    s = (0.5 ** 0.5) / 1.0  # unbiased std of [1, 0]
    exp = torch.tensor([0.5 / s, -0.5 / s, 0, 0, 0, 0])
    torch.testing.assert_close(out.advantages[:, 0], exp, atol=1e-5, rtol=1e-5)
    assert (out.advantages[~r.response_mask] == 0).all()
    assert (out.advantages[1, :6] == out.advantages[1, 0]).all()
    assert out.metrics["groups/all_wrong_frac"] == pytest.approx(1 / 3)
    assert out.metrics["groups/all_correct_frac"] == pytest.approx(1 / 3)
    assert out.eps_low.shape == (6,) and out.metrics["clip/eps_low_mean"] == pytest.approx(0.2)


def test_grpo_overlong_and_dr_grpo():
    cfg = AlgoConfig(method="grpo")
    cfg.overlong.enabled, cfg.overlong.max_length, cfg.overlong.cache_length = True, 10, 4
    cfg.advantage.scale_std = False
    r = make_batch([True, True], [6, 8], [0, 0])
    out = build_method(cfg).compute(r)
    # rewards 1 + 0 and 1 + (6 - 8)/4 = 0.5 -> mean 0.75
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor([0.25, -0.25]))


def test_global_length_penalty_arora_zanette():
    cfg = AlgoConfig(method="global_length_penalty")
    cfg.length_penalty.alpha = 0.4
    r = make_batch([True, True, False], [2, 6, 9], [0, 0, 0])
    out = build_method(cfg).compute(r)
    # correct lengths 2, 6: mu 4, population sd 2 -> z = -1, +1
    sig = torch.sigmoid(torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out.rewards[:2], 1 - 0.4 * sig)
    assert out.rewards[2] == 0


def test_kimi_reward():
    cfg = AlgoConfig(method="global_length_penalty")
    cfg.length_penalty.style = "kimi"
    r = make_batch([True, False, False], [2, 4, 10], [0, 0, 0])
    out = build_method(cfg).compute(r)
    # lam = 0.5 - (L - 2)/8 -> 0.5, 0.25, -0.5
    torch.testing.assert_close(out.rewards, torch.tensor([1.5, 0.0, -0.5]))


def test_bad_batches_raise():
    m = build_method(AlgoConfig(method="grpo"))
    r = make_batch([True, False], [3, 3], [0, 0])
    r.prompt_keys = ["a"]
    with pytest.raises(ValueError, match="prompt_keys"):
        m.compute(r)
    r = make_batch([True], [3], [0])
    r.correct = torch.tensor([True, False])
    with pytest.raises(ValueError, match="correct"):
        m.compute(r)
