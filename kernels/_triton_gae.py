"""Triton reverse linear-recurrence scan A_t = b_t + a_t * A_{t+1}, one program per row.

The row is loaded in reversed order and scanned *forward*: ``associative_scan(reverse=True)`` has an
open correctness issue on GPUs (triton-lang/triton#4362), the forward scan does not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lin_rec(a1, b1, a2, b2):
    # (a1, b1): composed map of the elements already scanned (later in time); (a2, b2): the current one
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _rev_scan_kernel(a_ptr, b_ptr, out_ptr, T, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    lanes = tl.arange(0, BLOCK_T)
    carry = tl.zeros((), dtype=tl.float32)
    for blk in tl.range(0, tl.cdiv(T, BLOCK_T)):
        tt = T - 1 - (blk * BLOCK_T + lanes)  # time index, decreasing along the lanes
        inb = tt >= 0
        a = tl.load(a_ptr + base + tt, mask=inb, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + base + tt, mask=inb, other=0.0).to(tl.float32)
        acc_a, acc_b = tl.associative_scan((a, b), axis=0, combine_fn=_lin_rec)
        adv = acc_b + acc_a * carry
        tl.store(out_ptr + base + tt, adv, mask=inb)
        carry = tl.sum(tl.where(lanes == BLOCK_T - 1, adv, 0.0), axis=0)  # A at this block's earliest time


def reverse_scan(a: torch.Tensor, b: torch.Tensor, block_t: int) -> torch.Tensor:
    """A[B, T] fp32 with A_t = b_t + a_t * A_{t+1} (A_T = 0); a, b contiguous fp32."""
    bsz, t = b.shape
    out = torch.empty_like(b)
    _rev_scan_kernel[(bsz,)](a, b, out, t, BLOCK_T=block_t)
    return out
