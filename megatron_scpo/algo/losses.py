"""Policy loss (the spec ``scpo_kernels.policy_loss``, the op that trains, must match exactly) and the
response-token SFT loss.

``sft_loss`` and ``truncated_is_weights`` are also the production code: the trainer's ``SFTLoss`` /
``PolicyLoss`` (``megatron_scpo/trainer/loss.py``) call them.

Per token, with ``ratio = exp(clamp(logp - old, -20, 20))`` and per-sample clip ranges::

    pg   = max(-A * ratio, -A * clamp(ratio, 1 - eps_low[b], 1 + eps_high[b]))
    pg   = min(pg, -A * c)            where A < 0      (dual-clip, c = dual_clip > 1)
    pg  *= tis_weights                                  (truncated IS weights, treated as constants)
    loss = pg + kl_coef * k3(logp, ref)                 k3 = clamp(exp(d) - d - 1, -10, 10), d = ref - logp

then aggregated over ``mask`` (see ``aggregate``). Padding positions are replaced by 0 before any
arithmetic, so garbage (even inf/NaN) outside the mask never reaches the loss or the gradient.
Metrics are token-means over the mask, detached, whatever the loss aggregation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megatron_scpo.algo.groups import check_finite

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0  # verl's low_var_kl clamps the k3 value to [-10, 10]


def aggregate(x: Tensor, mask: Tensor, agg: AggMode = "token-mean", norm_length: int | None = None) -> Tensor:
    """Reduce per-token ``x[B, T]`` over ``mask[B, T]``.

    token-mean: sum / #tokens. seq-mean-token-mean: mean over non-empty sequences of their token mean.
    seq-mean-token-sum-norm: sum / (#non-empty sequences * norm_length) (Dr.GRPO: a mean over sequences of the
    token sum over a constant, the generation budget; T when None). An empty row (a padding row, or a sample
    masked out by overlong filtering) is no sequence and does not dilute the others.
    An all-empty mask gives 0 (with a zero gradient), never NaN.
    """
    m = mask.to(x.dtype)
    xs = torch.where(mask.bool(), x, torch.zeros_like(x))
    if agg == "token-mean":
        return xs.sum() / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        per_seq_n = m.sum(dim=-1)
        per_seq = xs.sum(dim=-1) / per_seq_n.clamp(min=1.0)
        nonempty = (per_seq_n > 0).to(x.dtype)
        return (per_seq * nonempty).sum() / nonempty.sum().clamp(min=1.0)
    if agg == "seq-mean-token-sum-norm":
        norm = float(norm_length if norm_length is not None else x.shape[-1])
        if norm <= 0:
            raise ValueError(f"norm_length must be > 0, got {norm_length}")
        rows = (m.sum(dim=-1) > 0).to(x.dtype).sum().clamp(min=1.0)
        return xs.sum() / (rows * norm)
    raise ValueError(f"agg must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm; got {agg!r}")


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token [same shape], clamped to [-10, 10] as verl does.

    ``d = clamp(ref - logp, -20, 20)``, ``k3 = clamp(exp(d) - d - 1, -10, 10)``: non-negative, unbiased while
    below the clamp; a token far off the reference contributes at most 10 (and no gradient beyond).
    """
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float, mask: Tensor | None = None) -> Tensor:
    """Truncated importance weights ``min(pi_trainer / pi_rollout, cap)`` correcting engine/trainer mismatch."""
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    d = (old_logprobs - rollout_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = torch.exp(d).clamp(max=cap).detach()
    return w if mask is None else torch.where(mask.bool(), w, torch.zeros_like(w))


def _check_loss_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                       eps_low: Tensor, eps_high: Tensor) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} must match logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}")
    for name, t in (("eps_low", eps_low), ("eps_high", eps_high)):
        if t.shape != logprobs.shape[:1]:
            raise ValueError(f"{name} must be [B] = [{logprobs.shape[0]}], got {tuple(t.shape)}")
        if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite and >= 0")


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
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio surrogate with per-sample clip ranges; returns (scalar loss, detached metrics).

    Shapes: logprobs/old_logprobs/advantages/mask/tis_weights/ref_logprobs/entropy [B, T]; eps_* [B].
    Metrics: pg_loss, clipfrac_low (A<0, ratio<1-eps_low), clipfrac_high (A>0, ratio>1+eps_high),
    clipfrac (either), dualclip_frac, approx_kl (k3 of old vs current), ratio_mean; kl (k3 vs ref)
    when ref_logprobs is given, entropy when entropy is given.
    """
    _check_loss_inputs(logprobs, old_logprobs, advantages, mask, eps_low, eps_high)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = mask.bool()
    zero = torch.zeros_like(logprobs)
    lp = torch.where(m, logprobs, zero)
    old = torch.where(m, old_logprobs.to(logprobs.dtype), zero)
    adv = torch.where(m, advantages.to(logprobs.dtype), zero)
    check_finite("advantages (masked)", adv)
    check_finite("old_logprobs (masked)", old)

    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    lo = (1.0 - eps_low.to(lp.dtype))[:, None]
    hi = (1.0 + eps_high.to(lp.dtype))[:, None]
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, lo, hi)
    pg = torch.maximum(pg1, pg2)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg > pg3) & m
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    if tis_weights is not None:
        if tis_weights.shape != lp.shape:
            raise ValueError(f"tis_weights must be [B, T] = {tuple(lp.shape)}, got {tuple(tis_weights.shape)}")
        w = torch.where(m, tis_weights.detach().to(lp.dtype), zero)
        check_finite("tis_weights (masked)", w)
        pg = pg * w
    pg_loss = aggregate(pg, m, agg, norm_length)
    loss = pg_loss

    metrics: dict[str, Tensor] = {"pg_loss": pg_loss.detach()}
    if ref_logprobs is not None and kl_coef != 0.0:
        if ref_logprobs.shape != lp.shape:
            raise ValueError(f"ref_logprobs must be [B, T] = {tuple(lp.shape)}, got {tuple(ref_logprobs.shape)}")
        ref = torch.where(m, ref_logprobs.to(lp.dtype), zero)
        kl = kl_k3(lp, ref)
        loss = loss + kl_coef * aggregate(kl, m, agg, norm_length)
        metrics["kl"] = aggregate(kl.detach(), m)
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logprobs")

    with torch.no_grad():
        neg, pos = (adv < 0) & m, (adv > 0) & m
        low = neg & (ratio < lo)
        high = pos & (ratio > hi)
        f = lambda t: aggregate(t.to(lp.dtype), m)  # noqa: E731
        metrics["clipfrac_low"] = f(low)
        metrics["clipfrac_high"] = f(high)
        metrics["clipfrac"] = f(low | high)
        metrics["dualclip_frac"] = f(dual_active)
        metrics["approx_kl"] = aggregate(kl_k3(lp, old), m)
        metrics["ratio_mean"] = aggregate(ratio, m)
        if entropy is not None:
            metrics["entropy"] = aggregate(entropy.detach().to(lp.dtype), m)
    return loss, metrics


def sft_loss(logprobs: Tensor, mask: Tensor, agg: AggMode = "token-mean", norm_length: int | None = None) -> Tensor:
    """Response-token negative log-likelihood (stage-1 RS+SFT and warm start); prompt tokens are masked out."""
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs and mask must match, got {tuple(logprobs.shape)}, {tuple(mask.shape)}")
    lp = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    return aggregate(-lp, mask.bool(), agg, norm_length)
