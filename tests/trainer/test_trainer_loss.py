"""The trainer's loss functions (trainer/loss.py) against the algo spec, computed another way.

``PolicyLoss`` is what the backend runs on every RL micro-batch: its value and gradient must equal the spec
``algo.losses.policy_loss`` with the same knobs (TIS weights from the cap and the rollout log-probs, the k3 KL,
dual-clip, each aggregation), its stats the spec's token means times the token count. ``SFTLoss`` is the
response-token NLL, checked by hand. Config knobs reach the loss from the YAML in three hops.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_scpo.algo.config import ClipConfig, LossConfig
from megatron_scpo.algo.losses import policy_loss as spec_policy_loss
from megatron_scpo.algo.losses import truncated_is_weights
from megatron_scpo.backend.seam import TrainBatch
from megatron_scpo.trainer.loss import STAT_NAMES, PolicyLoss, SFTLoss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _batch(seed: int = 0, b: int = 4, s: int = 16) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(b, s, dtype=torch.bool)
    am[1, 11:] = False
    lm = am.clone()
    lm[:, :3] = False
    lm[2] = False  # an empty row
    lp = torch.randn(b, s, generator=g) * 0.3 - 1
    return TrainBatch(
        input_ids=torch.randint(0, 50, (b, s), generator=g), attention_mask=am, loss_mask=lm,
        advantages=torch.randn(b, s, generator=g), old_logprobs=lp + torch.randn(b, s, generator=g) * 0.3,
        eps_low=torch.rand(b, generator=g) * 0.3, eps_high=torch.rand(b, generator=g) * 0.3,
        ref_logprobs=lp + torch.randn(b, s, generator=g) * 0.3,
        rollout_logprobs=lp + torch.randn(b, s, generator=g) * 0.5,
    )


def _fn(**kw) -> PolicyLoss:
    base = dict(agg="token-mean", norm_length=None, kl_coef=0.0, tis_cap=None, dual_clip=None, temperature=1.0)
    return PolicyLoss(**{**base, **kw})


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.2])
@pytest.mark.parametrize("tis_cap", [None, 1.5])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_equals_the_spec(agg, kl_coef, tis_cap, dual_clip):
    mb = _batch()
    lp0 = mb.old_logprobs + 0.1 * torch.randn(mb.old_logprobs.shape, generator=torch.Generator().manual_seed(3))
    fn = _fn(agg=agg, kl_coef=kl_coef, tis_cap=tis_cap, dual_clip=dual_clip, norm_length=12)
    lp = lp0.clone().requires_grad_()
    value, stats = fn(mb, lp)
    (grad,) = torch.autograd.grad(value, lp)

    mask = mb.loss_mask
    tis = None if tis_cap is None else truncated_is_weights(mb.old_logprobs, mb.rollout_logprobs, cap=tis_cap)
    lp_s = lp0.clone().requires_grad_()
    ref_value, ref_m = spec_policy_loss(lp_s, mb.old_logprobs, mb.advantages, mask, mb.eps_low, mb.eps_high,
                                        dual_clip=dual_clip, tis_weights=tis, agg=agg, norm_length=12,
                                        ref_logprobs=mb.ref_logprobs if kl_coef else None, kl_coef=kl_coef)
    (ref_grad,) = torch.autograd.grad(ref_value, lp_s)
    assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)
    ntok = mask.sum().float()
    assert set(stats) == set(STAT_NAMES) == set(fn.stat_names)
    torch.testing.assert_close(stats["clip_frac_low"], ref_m["clipfrac_low"] * ntok)
    torch.testing.assert_close(stats["clip_frac_high"], ref_m["clipfrac_high"] * ntok)
    torch.testing.assert_close(stats["kl"], ref_m["kl"] * ntok if kl_coef else torch.zeros(()))
    assert float(fn.units(mask)) == (float(ntok) if agg == "token-mean" else 3.0)


def test_knobs_reach_the_loss_and_name_what_they_read():
    """YAML -> LossConfig / ClipConfig -> PolicyLoss -> kernel op; TIS and KL read their fields only when on."""
    from megatron_scpo.config import load_config

    cfg = load_config(None, ["algo.clip.dual_clip=2.5", "algo.loss.tis_cap=1.7", "algo.loss.kl_coef=0.1",
                             "algo.loss.agg=seq-mean-token-mean"])
    fn = PolicyLoss.from_config(cfg.algo.loss, cfg.algo.clip.dual_clip, temperature=0.7)
    assert (fn.dual_clip, fn.tis_cap, fn.kl_coef, fn.agg, fn.temperature) == (2.5, 1.7, 0.1, "seq-mean-token-mean", 0.7)
    assert set(fn.requires) == {"advantages", "old_logprobs", "eps_low", "eps_high", "ref_logprobs", "rollout_logprobs"}
    off = PolicyLoss.from_config(LossConfig(), ClipConfig().dual_clip, temperature=1.0)
    assert off.tis_cap is None and off.kl_coef == 0.0 and off.dual_clip == 3.0
    assert set(off.requires) == {"advantages", "old_logprobs", "eps_low", "eps_high"}
    # no TIS without a cap: the rollout log-probs are not read (no hidden default cap)
    mb = _batch()
    lp = mb.old_logprobs + 0.05
    a, _ = off(mb, lp)
    b, _ = off(replace(mb, rollout_logprobs=None, ref_logprobs=None), lp)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(agg="sum"), "agg"), (dict(dual_clip=0.5), "dual_clip"), (dict(tis_cap=0.0), "tis_cap"),
    (dict(tis_cap=float("nan")), "tis_cap"), (dict(kl_coef=-1.0), "kl_coef"), (dict(kl_coef=float("nan")), "kl_coef"),
    (dict(norm_length=0), "norm_length"), (dict(temperature=0.0), "temperature"),
    (dict(agg="seq-mean-token-sum-norm"), "needs norm_length"),  # a micro-batch's width is no constant normalizer
])
def test_policy_loss_refuses_bad_knobs_when_built(bad, match):
    with pytest.raises(ValueError, match=match):
        _fn(**bad)


def test_sft_loss_is_the_response_token_nll():
    mb = _batch()
    lp = (mb.old_logprobs.clone() * mb.attention_mask).requires_grad_()
    fn = SFTLoss()
    value, stats = fn(mb, lp)
    mask = mb.loss_mask
    by_hand = -(lp.detach() * mask).sum() / mask.sum()
    torch.testing.assert_close(value, by_hand)
    (grad,) = torch.autograd.grad(value, lp)
    torch.testing.assert_close(grad, -mask.float() / mask.sum())
    assert fn.requires == () and fn.temperature == 1.0 and float(fn.units(mask)) == float(mask.sum())
    assert set(stats) == set(STAT_NAMES) and all(float(v) == 0.0 for v in stats.values())
