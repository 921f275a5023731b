"""Triton per-token clipped-ratio surrogate, forward and backward (fp32 math, elementwise over [B, T]).

The backward reproduces torch autograd exactly, ties included: ``maximum``/``minimum`` split the
gradient in halves on equality, ``clamp`` passes it on the closed interval.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pg_terms(lp, old, adv, lo, hi, dual_c, LOG_RATIO_CLAMP: tl.constexpr, DUAL: tl.constexpr):
    d = lp - old
    dc = tl.minimum(tl.maximum(d, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    ratio = tl.exp(dc)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    pg = tl.maximum(pg1, pg2)
    pg3 = -adv * dual_c
    if DUAL:
        pg_out = tl.where(adv < 0, tl.minimum(pg, pg3), pg)
    else:
        pg_out = pg
    return d, ratio, pg1, pg2, pg, pg3, pg_out


@triton.jit
def _pg_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, lo_ptr, hi_ptr, gout_ptr, out_ptr, T, dual_c,
    BLOCK_T: tl.constexpr, DUAL: tl.constexpr, HAS_W: tl.constexpr, BACKWARD: tl.constexpr,
    LOG_RATIO_CLAMP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    msk = offs < T
    p = row * T + offs
    lp = tl.load(lp_ptr + p, mask=msk, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + p, mask=msk, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + p, mask=msk, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + row)
    hi = tl.load(hi_ptr + row)
    d, ratio, pg1, pg2, pg, pg3, pg_out = _pg_terms(lp, old, adv, lo, hi, dual_c, LOG_RATIO_CLAMP, DUAL)
    if HAS_W:
        w = tl.load(w_ptr + p, mask=msk, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_T,), 1.0, tl.float32)
    if BACKWARD:
        dr = tl.where((d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP), ratio, 0.0)
        g1 = -adv * dr
        g2 = tl.where((ratio >= lo) & (ratio <= hi), g1, 0.0)
        g = tl.where(pg1 > pg2, g1, tl.where(pg1 < pg2, g2, 0.5 * (g1 + g2)))
        if DUAL:
            gd = tl.where(pg < pg3, g, tl.where(pg > pg3, 0.0, 0.5 * g))
            g = tl.where(adv < 0, gd, g)
        gout = tl.load(gout_ptr + p, mask=msk, other=0.0).to(tl.float32)
        tl.store(out_ptr + p, g * w * gout, mask=msk)
    else:
        tl.store(out_ptr + p, pg_out * w, mask=msk)


def pg_launch(lp, old, adv, w, lo, hi, dual_c, gout, block_t: int, log_ratio_clamp: float) -> torch.Tensor:
    """Forward (gout None): per-token surrogate [B, T] fp32. Backward: d(sum gout*pg)/d(lp) [B, T] fp32."""
    b, t = lp.shape
    out = torch.empty((b, t), dtype=torch.float32, device=lp.device)
    _pg_kernel[(b, triton.cdiv(t, block_t))](
        lp, old, adv, w if w is not None else lp, lo, hi, gout if gout is not None else lp, out, t,
        float(dual_c) if dual_c is not None else 0.0,
        BLOCK_T=block_t, DUAL=dual_c is not None, HAS_W=w is not None, BACKWARD=gout is not None,
        LOG_RATIO_CLAMP=log_ratio_clamp,
    )
    return out
