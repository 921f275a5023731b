"""Triton kernels for fused log-probs/entropy (imported only when the Triton path runs).

fp32 inside: every load is upcast at once (bf16 arithmetic is also wrong in the interpreter) and the
store downcasts. Row offsets are int64 (row * stride overflows int32 past 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lse_partial_kernel(
    logits_ptr, stride_n, target_ptr, m_out, s_out, t_out, xt_out,
    V_local, vocab_start, split_size, SPLITS, inv_temp,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """One pass over a vocab range with an online logsumexp: partial (max, sum-exp, sum-exp*z, z_target)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    base = logits_ptr + row * stride_n
    lo = split * split_size
    hi = tl.minimum(lo + split_size, V_local)
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in tl.range(lo, hi, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < hi
        z = tl.load(base + offs, mask=msk, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: avoid (-inf) - (-inf)
        scale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        s = s * scale + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            t = t * scale + tl.sum(e * tl.where(z > -float("inf"), z, 0.0), axis=0)  # no 0 * (-inf)
        m = m_new
    tgt = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    here = (tgt >= lo) & (tgt < hi)
    xt = tl.load(base + tgt, mask=here, other=0.0).to(tl.float32) * inv_temp
    o = row * SPLITS + split
    tl.store(m_out + o, m)
    tl.store(s_out + o, s)
    tl.store(t_out + o, t)
    tl.store(xt_out + o, xt)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr, stride_n, grad_ptr, stride_gn, target_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    V_local, vocab_start, inv_temp,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """grad = [g_lp*(onehot - p) - g_ent*p*(log p + H)] / T, recomputing p from logits and the global lse."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    msk = offs < V_local
    z = tl.load(logits_ptr + row * stride_n + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp
    lse = tl.load(lse_ptr + row)
    glp = tl.load(glp_ptr + row)
    p = tl.exp(z - lse)
    tgt = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    g = tl.where(offs == tgt, glp, 0.0) - glp * p
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + row)
        gent = tl.load(gent_ptr + row)
        g = g - gent * p * (tl.where(p > 0, z, lse) - lse + ent)  # p = 0 where z = -inf: no 0 * (-inf)
    g = g * inv_temp
    tl.store(grad_ptr + row * stride_gn + offs, g.to(grad_ptr.dtype.element_ty), mask=msk)


def lse_partials(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float, with_entropy: bool,
    block_v: int, splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns [N, splits] fp32 partials (m, s, t, z_target)."""
    n, v = logits.shape
    splits = max(1, min(splits, triton.cdiv(v, block_v)))
    split_size = triton.cdiv(triton.cdiv(v, splits), block_v) * block_v
    splits = triton.cdiv(v, split_size)
    bufs = [torch.empty((n, splits), dtype=torch.float32, device=logits.device) for _ in range(4)]
    _lse_partial_kernel[(n, splits)](
        logits, logits.stride(0), targets, *bufs, v, vocab_start, split_size, splits, inv_temp,
        BLOCK_V=block_v, WITH_ENTROPY=with_entropy,
    )
    return bufs[0], bufs[1], bufs[2], bufs[3]


def logprob_backward(
    logits: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None,
    g_lp: torch.Tensor, g_ent: torch.Tensor | None, vocab_start: int, inv_temp: float, block_v: int,
) -> None:
    """Write d(loss)/d(logits) for this shard into ``grad`` (may alias ``logits``: each element is read first)."""
    n, v = logits.shape
    with_ent = g_ent is not None
    _logprob_bwd_kernel[(n, triton.cdiv(v, block_v))](
        logits, logits.stride(0), grad, grad.stride(0), targets, lse,
        ent if with_ent else lse, g_lp, g_ent if with_ent else g_lp,
        v, vocab_start, inv_temp, BLOCK_V=block_v, WITH_ENTROPY=with_ent,
    )
