"""The policy loss that trains: clipped ratio, per-sample clip ranges, dual-clip, TIS weights, k3 KL, aggregation.

The one home of the production loss, its aggregation modes and their units (``aggregate``, ``agg_units``).
Matches the spec in ``megatron_scpo/algo/losses.py`` (tests compare them; kernels may not import it):
per token, with ``ratio = exp(clamp(logp - old, -20, 20))``::

    pg   = max(-A * ratio, -A * clamp(ratio, 1 - eps_low[b], 1 + eps_high[b]))
    pg   = min(pg, -A * dual_clip)      where A < 0   (if dual_clip)
    pg   = pg * tis_weights                          (if given; constants)
    loss = agg(pg) + kl_coef * agg(k3(logp, ref))   (if kl_coef; k3 = clamp(exp(d) - d - 1, -10, 10), d = ref - logp)

Inputs outside ``mask`` are replaced by 0 first (garbage/NaN there never reaches loss or gradient).
Math is fp32 for every input dtype (fp64 stays fp64 on the torch path), unlike the spec, which
computes in the log-probs' dtype; for fp32 inputs the two agree. Aggregation (``agg``):
token-mean = sum / #tokens; seq-mean-token-mean = mean over non-empty rows of the row's token mean;
seq-mean-token-sum-norm = sum / (#non-empty rows * norm_length) (norm_length defaults to T). Empty mask -> 0.
The surrogate runs in Triton (``impl``); the KL term and the metrics are torch on both paths. The ``approx_kl``
metric is the spec's k3 of old vs current, clamped to [-10, 10]; ``kl`` the k3 vs the reference.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from ._dispatch import Impl, NonFiniteError, check_float, check_same_device, count_launch, resolve_impl

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


def check_loss_options(*, agg: str = "token-mean", norm_length: int | None = None, dual_clip: float | None = None,
                       kl_coef: float = 0.0) -> None:
    """The tensor-free arguments of ``policy_loss``; raises ValueError naming the argument.

    Public so a loss built ahead of time (the trainer's ``PolicyLoss``) fails when it is built, not inside a
    pipeline schedule where one rank raising would leave the others waiting.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}; got {agg!r}")
    if norm_length is not None and not norm_length > 0:
        raise ValueError(f"norm_length must be > 0, got {norm_length}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0.0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")


def agg_units(mask: Tensor, agg: str) -> Tensor:
    """How many units ``agg`` averages over in this (micro-)batch: tokens or non-empty rows (float64 scalar).

    Rows with no loss token (padding rows, samples masked out by overlong filtering) never count, exactly as
    in ``aggregate``. Summing units over micro-batches and DP ranks gives the global normalizer, so that
    sum_mb loss_mb * units_mb / units_global equals the loss of the whole global batch (the backend's scaling).
    """
    if agg == "token-mean":
        return mask.sum().to(torch.float64)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):  # both normalize by non-empty rows
        return (mask.sum(-1) > 0).sum().to(torch.float64)
    raise ValueError(f"loss aggregation {agg!r} is not supported; choose one of {list(AGG_MODES)}")


def _k3(logprobs: Tensor, other: Tensor) -> Tensor:
    """Schulman's k3 of KL(pi || other) per token, ``d = clamp(other - logp, -20, 20)``, clamped to [-10, 10]."""
    d = (other - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


def aggregate(x: Tensor, mask: Tensor, agg: AggMode = "token-mean", norm_length: int | None = None) -> Tensor:
    """Masked reduction of x [B, T] (see module docstring); never NaN on an empty mask."""
    m = mask.to(x.dtype)
    xs = torch.where(mask, x, torch.zeros_like(x))
    if agg == "token-mean":
        return xs.sum() / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        n = m.sum(dim=-1)
        nonempty = (n > 0).to(x.dtype)
        return (xs.sum(dim=-1) / n.clamp(min=1.0) * nonempty).sum() / nonempty.sum().clamp(min=1.0)
    if agg == "seq-mean-token-sum-norm":
        norm = float(norm_length if norm_length is not None else x.shape[-1])
        rows = (m.sum(dim=-1) > 0).to(x.dtype).sum().clamp(min=1.0)
        return xs.sum() / (rows * norm)
    raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}; got {agg!r}")


def _pg_torch(lp: Tensor, old: Tensor, adv: Tensor, lo: Tensor, hi: Tensor, dual_clip, w) -> Tensor:
    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo[:, None], hi[:, None]))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    return pg * w if w is not None else pg


class _PGTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, adv, w, lo, hi, dual_clip, block_t):
        from . import _triton_policy_loss as tp

        count_launch("policy_loss_fwd")
        ctx.save_for_backward(lp, old, adv, w, lo, hi)
        ctx.cfg = (dual_clip, block_t)
        return tp.pg_launch(lp, old, adv, w, lo, hi, dual_clip, None, block_t, LOG_RATIO_CLAMP)

    @staticmethod
    def backward(ctx, gout):
        from . import _triton_policy_loss as tp

        count_launch("policy_loss_bwd")
        lp, old, adv, w, lo, hi = ctx.saved_tensors
        dual_clip, block_t = ctx.cfg
        g = tp.pg_launch(lp, old, adv, w, lo, hi, dual_clip, gout.float().contiguous(), block_t, LOG_RATIO_CLAMP)
        return g.to(lp.dtype), None, None, None, None, None, None, None


def _check(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, tis_weights, ref_logprobs, dual_clip, agg,
           norm_length, kl_coef):
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(getattr(logprobs, 'shape', ()))}")
    if logprobs.numel() == 0:
        raise ValueError(f"policy_loss: empty batch, logprobs has shape {tuple(logprobs.shape)}")
    check_float("logprobs", logprobs)
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                    ("tis_weights", tis_weights), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must match logprobs {tuple(shape)}, got {tuple(t.shape)}")
    for name, t in (("eps_low", eps_low), ("eps_high", eps_high)):
        if t.shape != shape[:1]:
            raise ValueError(f"{name} must be [B] = [{shape[0]}], got {tuple(t.shape)}")
        if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite and >= 0")
    check_same_device({"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask,
                       "eps_low": eps_low, "eps_high": eps_high, "tis_weights": tis_weights,
                       "ref_logprobs": ref_logprobs})
    check_loss_options(agg=agg, norm_length=norm_length, dual_clip=dual_clip, kl_coef=kl_coef)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (reference-policy log-probs)")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: Tensor,
    eps_high: Tensor,
    *,
    dual_clip: float | None = None,
    tis_weights: Tensor | None = None,
    agg: AggMode = "token-mean",
    norm_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    impl: Impl = "auto",
    block_t: int = 1024,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss (differentiable w.r.t. ``logprobs`` only) and detached token-mean metrics.

    Shapes: logprobs/old_logprobs/advantages/mask/tis_weights/ref_logprobs [B, T]; eps_low/eps_high [B].
    ``kl_coef`` > 0 adds ``kl_coef * agg(k3(logprobs, ref_logprobs))`` (needs ``ref_logprobs``; with
    ``kl_coef`` 0 they are not read). Metrics: pg_loss (the surrogate alone), clipfrac_low (A<0,
    ratio<1-eps_low), clipfrac_high (A>0, ratio>1+eps_high), clipfrac (either), dualclip_frac (A<0, dual clip
    active), approx_kl (k3 of old vs current), ratio_mean; kl (k3 vs the reference) when kl_coef > 0.
    Raises ValueError for bad shapes/options, NonFiniteError for NaN/inf inputs on masked-in tokens.
    """
    _check(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, tis_weights, ref_logprobs, dual_clip, agg,
           norm_length, kl_coef)
    which = resolve_impl(impl, logprobs)
    cdt = torch.float64 if (logprobs.dtype == torch.float64 and which == "torch") else torch.float32
    m = mask.bool()
    zero = torch.zeros(logprobs.shape, dtype=cdt, device=logprobs.device)
    lp = torch.where(m, logprobs.to(cdt), zero)
    old = torch.where(m, old_logprobs.to(cdt), zero)
    adv = torch.where(m, advantages.to(cdt), zero)
    w = None if tis_weights is None else torch.where(m, tis_weights.detach().to(cdt), zero)
    ref = None if kl_coef == 0.0 else torch.where(m, ref_logprobs.to(cdt), zero)
    for name, t in (("advantages", adv), ("old_logprobs", old), ("tis_weights", w), ("ref_logprobs", ref)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} has NaN/inf on masked-in tokens")
    lo = (1.0 - eps_low.to(cdt)).contiguous()
    hi = (1.0 + eps_high.to(cdt)).contiguous()
    if which == "triton":
        if block_t <= 0 or block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of 2, got {block_t}")
        # the where() copies above are fresh, but may inherit a permuted layout: the kernel wants row-major
        cont = [None if x is None else x.contiguous() for x in (lp, old, adv, w)]
        pg = _PGTriton.apply(*cont, lo, hi, dual_clip, block_t)
    else:
        pg = _pg_torch(lp, old, adv, lo, hi, dual_clip, w)
    pg_loss = aggregate(pg, m, agg, norm_length)
    loss = pg_loss
    kl = None
    if ref is not None:
        kl = _k3(lp, ref)
        loss = loss + kl_coef * aggregate(kl, m, agg, norm_length)
    with torch.no_grad():
        ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        neg, pos = (adv < 0) & m, (adv > 0) & m
        low, high = neg & (ratio < lo[:, None]), pos & (ratio > hi[:, None])
        if dual_clip is not None:
            pg_undual = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo[:, None], hi[:, None]))
            dual = neg & (pg_undual > -adv * dual_clip)
        else:
            dual = torch.zeros_like(m)

        def f(t: Tensor) -> Tensor:
            return aggregate(t.to(cdt), m)

        metrics = {
            "pg_loss": pg_loss.detach(), "clipfrac_low": f(low), "clipfrac_high": f(high), "clipfrac": f(low | high),
            "dualclip_frac": f(dual), "approx_kl": f(_k3(lp, old)), "ratio_mean": f(ratio),
        }
        if kl is not None:
            metrics["kl"] = f(kl.detach())
    return loss, metrics
