"""Policy loss vs hand-computed numbers, analytic float64 gradients, aggregation modes, guards."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_scpo.algo.losses import aggregate, kl_k3, policy_loss, sft_loss, truncated_is_weights


def test_policy_loss_hand_computed():
    # one sample, 4 tokens, eps_low=0.2, eps_high=0.3
    r = torch.tensor([[0.5, 1.1, 1.5, 0.9]])
    lp = torch.log(r)
    old = torch.zeros_like(lp)
    adv = torch.tensor([[-1.0, 2.0, 1.0, -3.0]])
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, m = policy_loss(lp, old, adv, mask, torch.tensor([0.2]), torch.tensor([0.3]))
    # token 0: A<0, r=0.5<0.8 -> clipped: -A*0.8 = 0.8 ; token 1: A>0 r=1.1: -2.2 ;
    # token 2: A>0 r=1.5>1.3 clipped: -1.3 ; token 3: A<0 r=0.9 inside: 2.7
    expected = (0.8 - 2.2 - 1.3 + 2.7) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clipfrac_low"].item() == pytest.approx(0.25)
    assert m["clipfrac_high"].item() == pytest.approx(0.25)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    # dual clip c=3: token 3 with r=5 and A=-3 would be 15 -> capped to 9
    r2 = torch.tensor([[5.0]])
    loss2, m2 = policy_loss(torch.log(r2), torch.zeros(1, 1), torch.tensor([[-3.0]]), torch.ones(1, 1, dtype=torch.bool),
                            torch.tensor([0.2]), torch.tensor([0.2]), dual_clip=3.0)
    assert loss2.item() == pytest.approx(9.0, rel=1e-6)
    assert m2["dualclip_frac"].item() == 1.0


def test_aggregation_modes_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(x, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    # Dr.GRPO: mean over the 2 real sequences of token sum / norm_length; the empty third row is no sequence
    # (it used to count: 10 / (3 * 5)); the row-by-row reference: (6 / 5 + 4 / 5) / 2
    assert aggregate(x, mask, "seq-mean-token-sum-norm", norm_length=5).item() == pytest.approx((6 / 5 + 4 / 5) / 2)
    assert aggregate(x, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 4))
    # appending empty rows (padding, overlong-filtered samples) leaves every mode unchanged
    x2, m2 = torch.cat([x, torch.ones(2, 4)]), torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)])
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert aggregate(x2, m2, agg, norm_length=5).item() == pytest.approx(aggregate(x, mask, agg, norm_length=5).item())
    assert aggregate(x, torch.zeros_like(mask), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="agg"):
        aggregate(x, mask, "bogus")


def test_k3_kl_is_clamped_to_10_like_verl():
    """k3 = exp(d) - d - 1 (d = ref - logp) grows like exp(d): one token far below the reference would dominate.

    verl clamps the value to [-10, 10]; reference values computed with math, and no gradient past the clamp.
    """
    lp = torch.tensor([[-1.0, -16.0, -3.0, -40.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -3.0, -1.0]], dtype=torch.float64)
    k = kl_k3(lp, ref)
    d = [-0.5, 15.0, 0.0, 20.0]  # ref - logp, the last one already at the +-20 log-ratio clamp
    exp = [min(math.exp(v) - v - 1.0, 10.0) for v in d]
    torch.testing.assert_close(k, torch.tensor([exp], dtype=torch.float64))
    assert k.max().item() == 10.0
    (g,) = torch.autograd.grad(k.sum(), lp)
    assert g[0, 1] == 0 and g[0, 3] == 0 and g[0, 0] == pytest.approx(-math.exp(-0.5) + 1.0)


def _analytic_grad(lp, old, adv, mask, el, eh, c, w, ref, kl_coef):
    """d loss / d logp for token-mean aggregation, derived by hand (float64)."""
    n = float(mask.sum())
    g = torch.zeros_like(lp)
    B, T = lp.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(lp[b, t] - old[b, t])
            a = float(adv[b, t])
            lo, hi = 1 - float(el[b]), 1 + float(eh[b])
            rc = min(max(r, lo), hi)
            v1, v2 = -a * r, -a * rc
            grad = -a * r if v1 >= v2 and rc == r or v1 > v2 else 0.0  # unclipped branch carries d(ratio)
            val = max(v1, v2)
            if c is not None and a < 0 and val > -a * c:
                grad = 0.0
            grad *= float(w[b, t]) if w is not None else 1.0
            if kl_coef:
                d = float(ref[b, t] - lp[b, t])
                grad += kl_coef * (-math.exp(d) + 1.0)
            g[b, t] = grad / n
    return g


@given(seed=st.integers(0, 10_000), dual=st.booleans(), tis=st.booleans(), kl=st.booleans())
def test_gradient_matches_analytic_float64(seed, dual, tis, kl):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 5
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    el = torch.rand(B, generator=g, dtype=torch.float64) * 0.3
    eh = torch.rand(B, generator=g, dtype=torch.float64) * 0.3
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 if tis else None
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    c = 1.5 if dual else None
    kc = 0.1 if kl else 0.0
    loss, _ = policy_loss(lp, old, adv, mask, el, eh, dual_clip=c, tis_weights=w, ref_logprobs=ref, kl_coef=kc)
    loss.backward()
    expected = _analytic_grad(lp.detach(), old, adv, mask, el, eh, c, w, ref, kc)
    torch.testing.assert_close(lp.grad, expected, rtol=1e-9, atol=1e-12)
    # the float32 path agrees with the float64 reference
    lp32 = lp.detach().float().requires_grad_(True)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    loss32, _ = policy_loss(lp32, old.float(), adv.float(), mask, el.float(), eh.float(), dual_clip=c,
                            tis_weights=f(w), ref_logprobs=ref.float(), kl_coef=kc)
    loss32.backward()
    assert loss32.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(lp32.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_padding_garbage_never_leaks():
    lp = torch.tensor([[-1.0, float("nan")], [-0.5, float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("-inf")], [-0.4, 7.0]])
    adv = torch.tensor([[1.0, float("nan")], [-1.0, 3.0]])
    mask = torch.tensor([[True, False], [True, False]])
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        loss, m = policy_loss(lp, old, adv, mask, torch.full((2,), 0.2), torch.full((2,), 0.2), agg=agg,
                              ref_logprobs=torch.zeros(2, 2), kl_coef=0.1, entropy=torch.ones(2, 2))
        lp.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert lp.grad[:, 1].abs().sum() == 0
        assert all(torch.isfinite(v) for v in m.values())


def test_bad_inputs_raise():
    z = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    e = torch.full((2,), 0.2)
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(z, z, z, mask, torch.full((3,), 0.2), e)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, torch.full((2, 3), float("nan")), mask, e, e)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(z, z, z, mask, e, e, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, z, mask, e, e, dual_clip=0.5)


def test_kl_tis_sft():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    d = ref - lp
    torch.testing.assert_close(kl_k3(lp, ref), torch.exp(d) - d - 1)
    w = truncated_is_weights(torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -0.5]]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, math.exp(-0.5)]]))
    mask = torch.tensor([[True, False]])
    assert sft_loss(lp, mask).item() == pytest.approx(1.0)
