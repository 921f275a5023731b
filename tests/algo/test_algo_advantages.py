"""GRPO normalization, S-GAE (critic-free, critic) and clip ranges vs hand-computed numbers + properties."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_scpo.algo.advantages import (
    broadcast_to_tokens,
    discounted_reverse_sum,
    group_normalize,
    s_gae,
    s_gae_critic,
    values_at_step_starts,
)
from megatron_scpo.algo.clipping import adaptive_clip, clip_ranges
from megatron_scpo.algo.config import ClipConfig


def test_group_normalize_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 7.0])
    g = torch.tensor([5, 5, 5, 2, 2, 9])  # non-contiguous ids, a size-1 group
    a = group_normalize(r, g, eps=0.0)
    # group 5: mean 1/3, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(a[:3], torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s]))
    assert a[3:].abs().max() == 0  # identical rewards and singleton -> 0, never NaN
    dr = group_normalize(r, g, scale_std=False)
    torch.testing.assert_close(dr[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    with pytest.raises(ValueError, match="non-finite"):
        group_normalize(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="empty"):
        group_normalize(torch.zeros(0), torch.zeros(0, dtype=torch.long))


def test_s_gae_hand_computed():
    # group of 2 samples: steps [1, 0, 2] and [-1] -> mean 0.5, population std sqrt(1.25)
    r = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    a = s_gae(r, mask, torch.tensor([0, 0]), gamma_lambda=0.5, eps=0.0)
    sd = math.sqrt(1.25)
    rn = [(1 - 0.5) / sd, (0 - 0.5) / sd, (2 - 0.5) / sd]
    exp0 = [rn[0] + 0.5 * rn[1] + 0.25 * rn[2], rn[1] + 0.5 * rn[2], rn[2]]
    torch.testing.assert_close(a[0], torch.tensor(exp0, dtype=torch.float64))
    torch.testing.assert_close(a[1], torch.tensor([(-1 - 0.5) / sd, 0, 0], dtype=torch.float64))
    am = s_gae(r, mask, torch.tensor([0, 0]), gamma_lambda=0.5, reduce="mean", eps=0.0)
    assert am[0, 0].item() == pytest.approx(exp0[0] / 1.75)


@given(
    st.lists(st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=6),
    st.integers(1, 3),
)
def test_s_gae_gamma_lambda_one_is_process_supervision(rows, n_groups):
    B = len(rows)
    K = max(len(x) for x in rows)
    r = torch.zeros(B, K, dtype=torch.float64)
    mask = torch.zeros(B, K, dtype=torch.bool)
    for b, x in enumerate(rows):
        r[b, : len(x)] = torch.tensor(x, dtype=torch.float64)
        mask[b, : len(x)] = True
    gids = torch.tensor([b % n_groups for b in range(B)])
    a = s_gae(r, mask, gids, gamma_lambda=1.0, eps=1e-6)
    # DeepSeekMath process supervision: normalize every step reward over the group, advantage = sum of later ones
    for g in set(gids.tolist()):
        vals = [v for b, x in enumerate(rows) if gids[b] == g for v in x]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        for b, x in enumerate(rows):
            if gids[b] != g:
                continue
            rn = [(v - mu) / (sd + 1e-6) for v in x]
            for j in range(len(x)):
                assert a[b, j].item() == pytest.approx(sum(rn[j:]), abs=1e-9)
            assert a[b, len(x):].abs().sum() == 0


def test_s_gae_critic_and_token_broadcast():
    r = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[0.5, 1.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv, ret = s_gae_critic(r, v, mask, gamma=0.9, lam=0.8)
    d1 = 2.0 + 0 - 1.5
    d0 = 1.0 + 0.9 * 1.5 - 0.5
    torch.testing.assert_close(adv, torch.tensor([[d0 + 0.72 * d1, d1]], dtype=torch.float64))
    torch.testing.assert_close(ret, adv + v.double())
    step_ids = torch.tensor([[-1, 0, 0, 1, 1, 1, -1]])
    tok = broadcast_to_tokens(adv, step_ids)
    assert tok[0, 0] == 0 and tok[0, -1] == 0 and tok[0, 1] == adv[0, 0] and tok[0, 4] == adv[0, 1]
    vals = torch.arange(7.0)[None]
    torch.testing.assert_close(values_at_step_starts(vals, step_ids, 2), torch.tensor([[1.0, 3.0]]))
    with pytest.raises(ValueError, match="step_ids"):
        broadcast_to_tokens(adv, torch.tensor([[0, 2]]))
    assert discounted_reverse_sum(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), 0.5).shape == (2, 0)


def test_clip_hand_computed_and_invert():
    cfg = ClipConfig(adaptive=True, eps_low_min=0.1, eps_low_max=0.3, eps_high_min=0.2, eps_high_max=0.28)
    lo, hi = adaptive_clip(torch.tensor([True, False, True, True]), torch.tensor([0, 0, 1, 1]), cfg)
    torch.testing.assert_close(lo, torch.tensor([0.2, 0.2, 0.3, 0.3]))
    torch.testing.assert_close(hi, torch.tensor([0.24, 0.24, 0.28, 0.28]))
    cfg.invert = True
    lo, _ = clip_ranges(torch.tensor([0.0, 1.0]), cfg)
    torch.testing.assert_close(lo, torch.tensor([0.3, 0.1]))
    lo, hi = clip_ranges(torch.tensor([0.3]), ClipConfig(eps_low=0.2, eps_high=0.28))
    assert lo.item() == pytest.approx(0.2) and hi.item() == pytest.approx(0.28)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=20), st.booleans())
def test_clip_monotone_in_accuracy(ps, invert):
    cfg = ClipConfig(adaptive=True, eps_low_min=0.05, eps_low_max=0.25, eps_high_min=0.1, eps_high_max=0.3,
                     invert=invert)
    p = torch.tensor(sorted(ps))
    lo, hi = clip_ranges(p, cfg)
    sign = -1 if invert else 1
    assert bool((sign * lo.diff() >= -1e-7).all()) and bool((sign * hi.diff() >= -1e-7).all())
    assert bool((lo >= 0.05 - 1e-7).all() & (lo <= 0.25 + 1e-7).all())
