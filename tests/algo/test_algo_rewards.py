"""SCPO step reward, LAPO and progressive calibration vs hand-computed groups, plus property tests."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_scpo.algo.config import ScpoConfig
from megatron_scpo.algo.rewards.baselines import overlong_penalty
from megatron_scpo.algo.rewards.calibration import calibration_advantages, calibration_rewards, optimal_length
from megatron_scpo.algo.rewards.lapo import LengthMap, augment_prompt, lapo_stage1_rewards, lapo_stage2_rewards
from megatron_scpo.algo.rewards.scpo import scpo_step_rewards

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def scpo_example():
    lengths = torch.tensor([[2, 6, 0], [4, 0, 0], [1, 1, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    correct = torch.tensor([True, True, False])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    total = torch.tensor([8, 4, 3])
    return lengths, mask, correct, w, total


def test_scpo_step_reward_hand_computed():
    lengths, mask, correct, w, total = scpo_example()
    cfg = ScpoConfig(k1=0.4, k2=0.3, rho=2.0)
    r = scpo_step_rewards(lengths, mask, correct, torch.zeros(3, dtype=torch.long), w, total, cfg)
    sd = math.sqrt(8 / 3)  # correct steps 2, 6, 4: mean 4
    g0, g1 = 1 - 0.3 * sig(1.0), 1 - 0.3 * sig(-1.0)  # totals 8, 4: mean 6, sd 2
    exp = [
        [(1 - 0.4 * sig(0.0)) * g0, (1 - 0.4 * sig(2 / sd)) * g0, 0.0],
        [(1 - 0.4 * sig(0.0)) * g1, 0.0, 0.0],
        [-math.exp(-2 * 2 / 3), -math.exp(-2 * 1 / 3), -1.0],
    ]
    torch.testing.assert_close(r, torch.tensor(exp, dtype=torch.float64))
    cfg.k0 = 1.0
    r = scpo_step_rewards(lengths, mask, correct, torch.zeros(3, dtype=torch.long), w, total, cfg)
    assert r[2, 0].item() == pytest.approx(-math.exp(-4.0))
    with pytest.raises(ValueError, match="importance"):
        scpo_step_rewards(lengths, mask, correct, torch.zeros(3, dtype=torch.long), w * 3, total, cfg)


def test_lapo_stage1_hand_computed():
    correct = torch.tensor([True, True, True, True, True, False, True])
    lengths = torch.tensor([100, 200, 300, 400, 500, 50, 70])
    gids = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    r, bands = lapo_stage1_rewards(correct, lengths, gids, alpha=0.7, low_pct=30, high_pct=70, decay_width=100)
    assert bands[0] == pytest.approx((220.0, 380.0)) and bands[1] is None  # one correct length: no band
    torch.testing.assert_close(r, torch.tensor([1.0, 1.56, 1.7, 1.56, 1.0, 0.0, 1.0], dtype=torch.float64))


def test_length_map_dual_rule_and_state():
    m = LengthMap(4096)
    m.set_stage1("a", [100, 200, 300, 400])
    assert m.get("a") == 250 and m.budget("b") == 4096 and not m.is_solved("b")
    m.refine("a", [400, 500])  # solved: min(250, 450)
    assert m.get("a") == 250
    m.refine("a", [100])
    assert m.get("a") == 100
    m.refine("b", [])  # unsolved, no correct -> unchanged
    assert "b" not in m
    m.refine("b", [300, 600, 900])  # previously unsolved -> median
    assert m.get("b") == 600
    m.set_stage1("a", [])  # stage 1: nothing correct -> unsolved again
    assert not m.is_solved("a")
    m2 = LengthMap(100)
    m2.load_state_dict(m.state_dict())
    assert m2.state_dict() == m.state_dict() and m2.default_budget == 4096
    with pytest.raises(ValueError, match="finite"):
        m2.load_state_dict({"medians": {"x": float("nan")}})


def test_lapo_stage2_reward_and_prompt():
    r = lapo_stage2_rewards(torch.tensor([True, True, False]), torch.tensor([300, 420, 300]),
                            torch.tensor([300.0, 300.0, 300.0]), beta=0.8, sigma=120.0)
    torch.testing.assert_close(r, torch.tensor([1.8, 1 + 0.8 * math.exp(-0.5), 0.0], dtype=torch.float64))
    t = " I will answer the question with {n} tokens."
    assert augment_prompt("Q. Assistant: <think>", 250, t) == "Q. Assistant: <think> I will answer the question with 250 tokens."
    assert augment_prompt("Q.\n", 7, t) == "Q.\n<think> I will answer the question with 7 tokens."


@given(st.lists(st.tuples(st.integers(1, 2000), st.booleans()), min_size=1, max_size=12),
       st.floats(0.1, 2.0))
def test_lapo_reward_is_one_plus_alpha_inside_band(samples, alpha):
    lengths = torch.tensor([s[0] for s in samples])
    correct = torch.tensor([s[1] for s in samples])
    r, bands = lapo_stage1_rewards(correct, lengths, torch.zeros(len(samples), dtype=torch.long), alpha=alpha,
                                   low_pct=30, high_pct=70, decay_width=100)
    cl = [s[0] for s in samples if s[1]]
    if cl:
        lo, hi = np.percentile(cl, 30), np.percentile(cl, 70)
    for (L, c), ri in zip(samples, r.tolist()):
        if not c:
            assert ri == 0.0
        elif lo < hi and lo <= L <= hi:
            assert ri == pytest.approx(1 + alpha)
        else:
            assert 1.0 <= ri <= 1 + alpha + 1e-12


def test_calibration_hand_computed():
    lengths = torch.tensor([100, 200, 300, 400])
    correct = torch.tensor([True, True, False, False])
    assert optimal_length(lengths, correct) == pytest.approx(125.0)
    r, d, lam, lopt = calibration_rewards(correct, lengths, torch.zeros(4, dtype=torch.long))
    L = 0.5 / (75 - 18.75 + 1e-6)
    torch.testing.assert_close(d, torch.tensor([0.0, 75.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r, torch.tensor([1.0, 1 - 75 * L, 0.0, 0.0], dtype=torch.float64))
    assert lam[0].item() == pytest.approx(L)
    # degenerate branches
    assert optimal_length(lengths, torch.ones(4, dtype=torch.bool)) == 100
    assert optimal_length(lengths, torch.zeros(4, dtype=torch.bool)) == 400
    # equal variances (2.25), mu2 = 2.5 > mu1 = 1.5: likelihood ratio increases in l -> max L (upstream sync: min)
    assert optimal_length(torch.tensor([0, 1, 1, 4]), torch.tensor([False, True, False, True])) == 4
    assert optimal_length(torch.tensor([0, 3, 3, 4]), torch.tensor([True, False, True, False])) == 0
    # one correct sample: sigma2 = 0 -> l_opt = its length
    assert optimal_length(torch.tensor([10, 20, 60]), torch.tensor([False, True, False])) == pytest.approx(20.0)
    # sigma2 > sigma1 (convex): the endpoint with the larger log-ratio; here correct = the extremes
    lo = optimal_length(torch.tensor([0, 5, 5, 5, 11]), torch.tensor([True, False, False, False, True]))
    assert lo == 11  # mu2 = 5.5 > mu1 = 5.2 tilts toward max L
    # all-correct / all-wrong groups: Lambda = 0, rewards = accuracy, advantages 0
    r, d, lam, _ = calibration_rewards(torch.tensor([True, True, False]), torch.tensor([5, 9, 7]),
                                       torch.tensor([0, 0, 1]))
    assert lam.abs().sum() == 0  # d = ReLU(l - min L) is defined but carries no weight
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    adv = calibration_advantages(r, torch.tensor([True, True, False]), torch.tensor([0, 0, 1]))
    assert adv.abs().sum() == 0


@given(st.lists(st.tuples(st.integers(1, 5000), st.booleans()), min_size=1, max_size=16), st.integers(1, 3),
       st.sampled_from(["population", "unbiased"]))
def test_calibration_sign_property(samples, n_groups, variance):
    lengths = torch.tensor([s[0] for s in samples])
    correct = torch.tensor([s[1] for s in samples])
    gids = torch.arange(len(samples)) % n_groups
    r, d, lam, lopt = calibration_rewards(correct, lengths, gids, variance=variance)
    for g in range(n_groups):
        sel = gids == g
        if not bool(sel.any()):
            continue
        centred = r[sel] - r[sel].mean()  # the unclamped quantity the Lambda bound protects
        assert bool((centred[correct[sel]] >= -1e-9).all())
        assert bool((centred[~correct[sel]] <= 1e-9).all())
        assert float(lengths[sel].min()) <= float(lopt[sel][0]) <= float(lengths[sel].max())
    adv = calibration_advantages(r, correct, gids)
    assert bool((adv[correct] >= 0).all()) and bool((adv[~correct] <= 0).all())
    assert torch.isfinite(adv).all()


def test_overlong_penalty_hand_computed():
    p = overlong_penalty(torch.tensor([5, 6, 8, 10, 11]), max_length=10, cache_length=4, factor=2.0)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, -1.0, -2.0, -2.0], dtype=torch.float64))
