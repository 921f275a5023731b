"""The policy loss that trains (scpo_kernels.policy_loss, run by the trainer's PolicyLoss through the backend):
torch path bitwise equal to the algo spec with KL / TIS / dual-clip / each aggregation, Triton (interpreted)
within 1e-6; ``agg_units`` reproduces the global aggregate from micro-batches."""

from __future__ import annotations

import pytest
import torch
from scpo_kernels import LAUNCHES, agg_units, aggregate, policy_loss

from megatron_scpo.algo.losses import policy_loss as spec_policy_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _inputs(seed: int, b: int, t: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(b, t, generator=g) * 0.3 - 1).to(dtype)
    old = (lp.float() + torch.randn(b, t, generator=g) * 0.3).to(dtype)
    adv = torch.randn(b, t, generator=g)
    adv[0, :4] = 0.0
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[-1] = False  # an empty row
    eps_low = torch.rand(b, generator=g) * 0.3
    eps_high = torch.rand(b, generator=g) * 0.3
    tis = torch.rand(b, t, generator=g) * 2
    return lp, old, adv, mask, eps_low, eps_high, tis


def _ref(lp: torch.Tensor, seed: int) -> torch.Tensor:
    """Reference log-probs near the policy, one token far off (k3 past its clamp), garbage off the mask."""
    g = torch.Generator().manual_seed(seed + 1)
    ref = lp.float() + torch.randn(lp.shape, generator=g) * 0.3
    ref[0, -1] = lp[0, -1].float() + 15.0
    return ref


def _run(fn, lp, *args, **kw):
    x = lp.detach().clone().requires_grad_()
    loss, metrics = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("tis", [False, True])
@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("shape", [(5, 77), (3, 1000)])
def test_matches_algo_spec(agg, dual_clip, tis, kl, shape):
    lp, old, adv, mask, el, eh, w = _inputs(shape[1], *shape)
    kw = dict(dual_clip=dual_clip, tis_weights=w if tis else None, agg=agg, norm_length=50)
    if kl:
        kw.update(ref_logprobs=_ref(lp, shape[1]), kl_coef=0.3)
    ls, gs, ms = _run(spec_policy_loss, lp, old, adv, mask, el, eh, **kw)
    lt, gt, mt = _run(policy_loss, lp, old, adv, mask, el, eh, impl="torch", **kw)
    assert torch.equal(lt, ls) and torch.equal(gt, gs)  # exactly the spec
    assert set(mt) == set(ms) and ("kl" in mt) == kl
    for k in ms:
        assert torch.equal(mt[k], ms[k]), k
    if kl:  # the KL term really is in the loss: the surrogate alone differs
        assert not torch.equal(lt, mt["pg_loss"])
    lk, gk, mk = _run(policy_loss, lp, old, adv, mask, el, eh, impl="triton", block_t=64, **kw)
    torch.testing.assert_close(lk, ls, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gk, gs, rtol=1e-6, atol=1e-8)
    for k in ms:
        torch.testing.assert_close(mk[k], ms[k], rtol=1e-6, atol=1e-7)


def test_ties_and_clip_boundaries_follow_autograd():
    """ratio exactly 1 = 1 +- eps with eps 0: max(pg1, pg2) ties and clamp sits on both ends of its range.

    torch splits a tied max/min gradient in halves and clamp passes it on the closed range; the
    Triton backward reproduces that. (A dual-clip tie needs ratio == c > 1, which depends on exp's last
    ulp, so it is not constructed here.)
    """
    b, t = 2, 6
    lp = torch.zeros(b, t)
    old = torch.zeros(b, t)
    adv = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.0, 1.0], [1.0, -1.0, 1.0, -1.0, -3.0, 3.0]])
    mask = torch.ones(b, t, dtype=torch.bool)
    el, eh = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    for dual in (None, 3.0):
        ls, gs, _ = _run(spec_policy_loss, lp, old, adv, mask, el, eh, dual_clip=dual)
        lk, gk, _ = _run(policy_loss, lp, old, adv, mask, el, eh, dual_clip=dual, impl="triton", block_t=8)
        torch.testing.assert_close(lk, ls)
        torch.testing.assert_close(gk, gs, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(gs, -adv / adv.numel())  # both halves of the tie add back up


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_logprobs_within_2e2_of_fp32_spec(impl):
    lp, old, adv, mask, el, eh, w = _inputs(7, 4, 300, dtype=torch.bfloat16)
    ls, gs, _ = _run(spec_policy_loss, lp.float(), old.float(), adv, mask, el, eh, tis_weights=w, dual_clip=3.0)
    lk, gk, _ = _run(policy_loss, lp, old, adv, mask, el, eh, tis_weights=w, dual_clip=3.0, impl=impl, block_t=128)
    assert gk.dtype == torch.bfloat16
    assert abs(lk - ls) <= 2e-2 * abs(ls)
    assert (gk.float() - gs).abs().max() <= 2e-2 * gs.abs().max()


def test_hand_computed_clipping():
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = policy_loss(lp, old, adv, mask, torch.tensor([0.2]), torch.tensor([0.3]), impl="triton", block_t=4)
    # token losses: -1*1.3 (clipped high), max(0.5, 0.8)=0.8 (clipped low), -1.1, -2*0.5 (not clipped, A>0)
    torch.testing.assert_close(loss, torch.tensor((-1.3 + 0.8 - 1.1 - 1.0) / 4))
    assert m["clipfrac_high"] == 0.25 and m["clipfrac_low"] == 0.25 and m["clipfrac"] == 0.5


def test_garbage_outside_mask_is_ignored_and_triton_runs():
    lp, old, adv, mask, el, eh, _ = _inputs(8, 3, 40)
    lp2, old2, adv2 = lp.clone(), old.clone(), adv.clone()
    for x in (lp2, old2, adv2):
        x[~mask] = float("nan")
    before = LAUNCHES.get("policy_loss_bwd", 0)
    la, ga, _ = _run(policy_loss, lp, old, adv, mask, el, eh, impl="triton", block_t=16)
    lb, gb, _ = _run(policy_loss, lp2, old2, adv2, mask, el, eh, impl="triton", block_t=16)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert LAUNCHES["policy_loss_bwd"] == before + 2


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_raises(impl):
    lp, old, adv, mask, el, eh, w = _inputs(9, 3, 10)
    with pytest.raises(ValueError, match="old_logprobs must match"):
        policy_loss(lp, old[:, :5], adv, mask, el, eh, impl=impl)
    with pytest.raises(ValueError, match="eps_low must be"):
        policy_loss(lp, old, adv, mask, el[:2], eh, impl=impl)
    with pytest.raises(ValueError, match="empty batch"):
        policy_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool),
                    torch.zeros(0), torch.zeros(0), impl=impl)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, adv, mask, el, eh, dual_clip=0.5, impl=impl)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(lp, old, adv, mask, el, eh, agg="sum", impl=impl)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(lp, old, adv, mask, el, eh, kl_coef=0.1, impl=impl)
    with pytest.raises(ValueError, match="kl_coef"):
        policy_loss(lp, old, adv, mask, el, eh, ref_logprobs=lp, kl_coef=float("nan"), impl=impl)
    with pytest.raises(ValueError, match="ref_logprobs must match"):
        policy_loss(lp, old, adv, mask, el, eh, ref_logprobs=lp[:, :5], kl_coef=0.1, impl=impl)
    bad = adv.clone()
    bad[mask] = float("inf")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, bad, mask, el, eh, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_empty_rows_do_not_count_and_kl_metric_is_clamped(impl):
    """seq-mean-token-sum-norm divides by the non-empty rows (empty rows used to count) and approx_kl is the spec's
    clamped k3; both kernels match the spec and a row-by-row reference."""
    lp, old, adv, mask, el, eh, _ = _inputs(11, 4, 30)
    mask[-1] = True
    old[0, :5] = lp[0, :5] + 15.0  # far off: k3 ~ exp(15) before the [-10, 10] clamp
    kw = dict(agg="seq-mean-token-sum-norm", norm_length=40)
    base, _, m_base = _run(policy_loss, lp, old, adv, mask, el, eh, impl=impl, block_t=32, **kw)
    pad = lambda t, v: torch.cat([t, torch.full((3, *t.shape[1:]), v, dtype=t.dtype)])  # noqa: E731
    padded, _, _ = _run(policy_loss, pad(lp, -1.0), pad(old, -1.0), pad(adv, 1.0), pad(mask, False), pad(el, 0.2),
                        pad(eh, 0.2), impl=impl, block_t=32, **kw)
    torch.testing.assert_close(padded, base, rtol=1e-6, atol=1e-7)
    spec, _, m_spec = _run(spec_policy_loss, lp, old, adv, mask, el, eh, **kw)
    torch.testing.assert_close(base, spec, rtol=1e-6, atol=1e-7)
    per_row = [policy_loss(lp[b:b + 1], old[b:b + 1], adv[b:b + 1], mask[b:b + 1], el[b:b + 1], eh[b:b + 1],
                           impl="torch", **kw)[0] for b in range(4)]
    torch.testing.assert_close(base, torch.stack(per_row).mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_base["approx_kl"], m_spec["approx_kl"], rtol=1e-6, atol=1e-7)
    assert m_base["approx_kl"] <= 10.0


@pytest.mark.parametrize("agg", AGGS)
def test_agg_units_weight_micro_batches_to_the_global_aggregate(agg):
    """sum over micro-batches of aggregate(mb) * units(mb) / units(all) == aggregate(all) (the backend's scaling),
    empty rows included; the units are tokens (token-mean) or non-empty rows (the two seq modes)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[2] = False
    total = float(agg_units(mask, agg))
    assert total == (float(mask.sum()) if agg == "token-mean" else 5.0)
    parts = sum(aggregate(x[i:i + 2], mask[i:i + 2], agg) * float(agg_units(mask[i:i + 2], agg)) / total
                for i in range(0, 6, 2))
    torch.testing.assert_close(parts, aggregate(x, mask, agg))
    with pytest.raises(ValueError, match="not supported"):
        agg_units(mask, "sum")
