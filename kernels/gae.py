"""S-GAE: segmented reverse scan where the discount applies only at step boundaries.

Semantics (per row of a [B, T] batch; ``mask`` marks response tokens, everything else is ignored):

* A *step* is a maximal run of valid tokens with the same ``step_ids`` value (masked tokens in
  between do not split it), or the valid tokens up to and including a ``boundaries`` flag. With
  neither, every valid token is its own step: plain token-level GAE.
* The step reward ``r_j`` is the **sum of ``rewards`` over the valid tokens of step j** (so put a step
  reward on any one token of the step, e.g. its last; a sequence reward on the last token). Rewards
  on masked tokens are ignored.
* Without ``values``: ``delta_j = r_j``. With ``values`` (critic mode; ``values[t]`` is V of the state
  before token t): ``delta_j = r_j + gamma * V_{j+1} - V_j`` with ``V_j`` = value at the first token of
  step j and ``V_{K+1} = 0``.
* ``A_j = sum_{m >= j} (gamma*lam)^(m-j) delta_m``; every token of step j gets ``A_j``; returns are
  ``A_j + V_j`` (``A_j`` without values); masked tokens get 0.
* ``seq_ends`` (packed rows): a True flag ends a sequence: no discounting/values flow across it. The
  last valid token of a row always ends its sequence.

The scan itself is a linear recurrence ``A_t = b_t + a_t A_{t+1}`` with ``b_t = delta_j`` and
``a_t = gamma*lam`` (0 at a sequence end) on each step's last token, ``a_t = 1, b_t = 0`` elsewhere.
Triton scans that per row; the torch path compacts steps into [sequences, steps] and uses a blocked
constant-coefficient discounted suffix sum (two small matmuls per level), which is fully vectorized.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import Impl, check_2d, check_float, check_same_device, count_launch, resolve_impl

_SCAN_BLOCK = 64


def discounted_suffix_sum(d: torch.Tensor, g: float, block: int = _SCAN_BLOCK) -> torch.Tensor:
    """``out[:, i] = sum_{m >= i} g^(m-i) d[:, m]`` for d [R, S], vectorized with blocked matmuls.

    Powers are formed directly (never divided), so long horizons underflow harmlessly to 0.
    """
    r, s = d.shape
    k = min(s, block)
    e = torch.arange(k, device=d.device, dtype=torch.float64)
    expo = e[None, :] - e[:, None]
    gm = torch.where(expo >= 0, torch.pow(torch.tensor(g, dtype=torch.float64), expo.clamp(min=0)), 0.0).to(d.dtype)
    if s <= block:
        return d @ gm.T
    nb = math.ceil(s / block)
    x = torch.nn.functional.pad(d, (0, nb * block - s)).view(r, nb, block)
    local = x @ gm.T
    carry = discounted_suffix_sum(local[:, :, 0].contiguous(), g**block, block)
    carry_next = torch.nn.functional.pad(carry[:, 1:], (0, 1))
    tail = torch.pow(torch.tensor(g, dtype=torch.float64), block - e).to(d.dtype)  # g^(block - i)
    out = local + carry_next[:, :, None] * tail
    return out.reshape(r, nb * block)[:, :s]


def _prepare(rewards, valid, step_ids, boundaries, seq_ends, values, gamma, dtype):
    """Compact the valid tokens (row-major) and reduce them to steps.

    Returns (vi: flat positions of valid tokens, k: step index of each valid token, end_pos: flat
    positions of step ends, delta/has_next/v_first per step). Every op is O(#valid tokens) with
    no Python loop: this is the CPU hot path.
    """
    bsz, t = valid.shape
    vi = valid.reshape(-1).nonzero().squeeze(1)
    n = vi.numel()
    dev = vi.device
    row = torch.div(vi, t, rounding_mode="floor")
    has_next = torch.zeros(n, dtype=torch.bool, device=dev)
    has_next[:-1] = row[1:] == row[:-1]
    if seq_ends is not None:  # a sequence end anywhere in [this token, next valid token) cuts the chain
        cs = seq_ends.reshape(-1).long().cumsum(0)
        before = cs.index_select(0, vi) - seq_ends.reshape(-1).long().index_select(0, vi)
        has_next[:-1] &= cs.index_select(0, vi[1:] - 1) == before[:-1]
    if step_ids is None and boundaries is None:
        end = torch.ones(n, dtype=torch.bool, device=dev)
        k = torch.arange(n, device=dev)
        delta = rewards.reshape(-1).index_select(0, vi).to(dtype)
    else:
        if step_ids is not None:
            sid = step_ids.reshape(-1).index_select(0, vi)
            end = torch.ones(n, dtype=torch.bool, device=dev)
            end[:-1] = sid[1:] != sid[:-1]
        else:
            end = boundaries.reshape(-1).index_select(0, vi).bool()
        end |= ~has_next
        k = end.cumsum(0) - end.long()
        n_steps = int(k[-1]) + 1
        delta = torch.zeros(n_steps, device=dev, dtype=dtype).index_add_(
            0, k, rewards.reshape(-1).index_select(0, vi).to(dtype)
        )
    end_at = end.nonzero().squeeze(1)
    has_next_step = has_next.index_select(0, end_at)
    v_first = None
    if values is not None:
        vv = values.reshape(-1).index_select(0, vi).to(dtype)
        start = torch.ones(n, dtype=torch.bool, device=dev)
        start[1:] = end[:-1]
        v_first = vv[start]
        v_next = torch.zeros_like(v_first)
        v_next[:-1] = v_first[1:]
        delta = delta + torch.where(has_next_step, gamma * v_next, 0.0) - v_first
    return vi, k, vi.index_select(0, end_at), delta, has_next_step, v_first


def _segmented_discount(delta: torch.Tensor, has_next: torch.Tensor, gl: float) -> torch.Tensor:
    """Per-step A_j = delta_j + gl * A_(j+1) within chains (a chain ends where has_next is False)."""
    n = delta.numel()
    last = ~has_next
    seg = last.cumsum(0) - last.long()
    k = torch.arange(n, device=delta.device)
    seg_start = torch.ones_like(last)
    seg_start[1:] = last[:-1]
    pos = k - torch.where(seg_start, k, 0).cummax(0).values
    n_seg, s_max = int(seg[-1]) + 1, int(pos.max()) + 1
    flat = seg * s_max + pos
    dense = torch.zeros(n_seg * s_max, device=delta.device, dtype=delta.dtype).index_copy_(0, flat, delta)
    return discounted_suffix_sum(dense.view(n_seg, s_max), gl).reshape(-1).index_select(0, flat)


def segmented_gae(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    step_ids: torch.Tensor | None = None,
    boundaries: torch.Tensor | None = None,
    seq_ends: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    values: torch.Tensor | None = None,
    impl: Impl = "auto",
    block_t: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-level (S-)GAE over [B, T] tokens; see the module docstring for exact semantics.

    rewards/values: float [B, T]; mask: bool/0-1 [B, T]; step_ids: int [B, T] or boundaries: bool
    [B, T] (True on each step's last token), not both; seq_ends: bool [B, T] for packed rows.
    Returns (advantages, returns), fp32 [B, T] (fp64 if rewards are fp64), 0 on masked tokens.
    ``block_t``: Triton time block (power of 2).
    """
    check_2d("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    shape = tuple(rewards.shape)
    if rewards.numel() == 0:
        raise ValueError(f"segmented_gae: empty batch, rewards has shape {shape}")
    check_float("rewards", rewards)
    named = {"mask": mask, "step_ids": step_ids, "boundaries": boundaries, "seq_ends": seq_ends, "values": values}
    for name, tns in named.items():
        if tns is not None:
            check_2d(name, tns, shape)
    check_same_device({"rewards": rewards, **named})
    if step_ids is not None and boundaries is not None:
        raise ValueError("pass step_ids or boundaries, not both")
    if step_ids is not None and (step_ids.is_floating_point() or step_ids.dtype == torch.bool):
        raise ValueError(f"step_ids must be an integer tensor, got {step_ids.dtype}")
    if values is not None:
        check_float("values", values)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(x, (int, float)) and 0.0 <= x <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    valid = mask.bool()
    for name, tns in (("rewards", rewards), ("values", values)):
        if tns is not None and not bool(torch.isfinite(tns).logical_or_(~valid).all()):
            raise ValueError(f"{name} contains NaN/inf on valid (mask=1) tokens")
    which = resolve_impl(impl, rewards)
    if which == "triton" and (block_t <= 0 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of 2, got {block_t}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    adv = torch.zeros(shape, device=rewards.device, dtype=dtype)
    if not bool(valid.any()):
        return adv, adv.clone()
    gl = float(gamma) * float(lam)
    vi, k, end_pos, delta, has_next, v_first = _prepare(
        rewards, valid, step_ids, boundaries, seq_ends, values, float(gamma), dtype
    )
    if which == "triton":
        from . import _triton_gae as tg

        count_launch("gae_scan")
        coef = torch.ones(rewards.numel(), device=rewards.device)
        coef[end_pos] = torch.where(has_next, gl, 0.0).float()
        b = torch.zeros(rewards.numel(), device=rewards.device)
        b[end_pos] = delta.float()
        a_tok = tg.reverse_scan(coef.view(shape), b.view(shape), block_t).reshape(-1).index_select(0, vi).to(dtype)
    else:
        a_tok = _segmented_discount(delta, has_next, gl).index_select(0, k)
    adv.view(-1).index_copy_(0, vi, a_tok)
    if v_first is None:
        return adv, adv.clone()
    ret = torch.zeros_like(adv)
    ret.view(-1).index_copy_(0, vi, a_tok + v_first.index_select(0, k))
    return adv, ret
