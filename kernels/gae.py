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


def _next_valid(valid: torch.Tensor) -> torch.Tensor:
    """Index of the next valid token strictly after t (T if none)."""
    bsz, t = valid.shape
    idx = torch.arange(t, device=valid.device).expand(bsz, t)
    cand = torch.where(valid, idx, t)
    incl = cand.flip(1).cummin(1).values.flip(1)  # min over s >= t
    return torch.cat([incl[:, 1:], torch.full((bsz, 1), t, device=valid.device, dtype=incl.dtype)], 1)


def _prepare(rewards, valid, step_ids, boundaries, seq_ends, values, gamma, lam, dtype):
    """Per-token (a, b) of the recurrence, step-end flags, each token's step index and step-start value.

    Written with full-size gathers only (no boolean-mask indexing): this is the CPU hot path.
    """
    bsz, t = valid.shape
    dev = valid.device
    token_level = step_ids is None and boundaries is None
    nxt = _next_valid(valid)
    nxt_c = nxt.clamp(max=t - 1)
    has_next = nxt < t
    if seq_ends is not None:
        cs = seq_ends.long().cumsum(1)
        crossing = cs.gather(1, (nxt - 1).clamp(max=t - 1)) - (cs - seq_ends.long()) > 0  # a flag in [t, nxt)
        has_next &= ~crossing
    if token_level:
        end = valid
    else:
        split = step_ids.gather(1, nxt_c) != step_ids if step_ids is not None else boundaries.bool()
        end = valid & (split | ~has_next)
    flat_end = end.reshape(-1)
    k_excl = flat_end.cumsum(0) - flat_end.long()  # step index (row-major) of every valid token
    rv = torch.where(valid, rewards, 0.0).to(dtype)
    if token_level:
        delta = rv
    else:  # step reward = sum over the step's valid tokens, landed on the step's end token
        n_steps = int(k_excl[-1]) + int(flat_end[-1])
        r_step = torch.zeros(n_steps + 1, device=dev, dtype=dtype).index_add_(0, k_excl, rv.reshape(-1))
        delta = torch.where(end, r_step.index_select(0, k_excl).view(bsz, t), 0.0)
    v_first = None
    if values is not None:
        v = values.to(dtype)
        if token_level:
            v_first = v
        else:
            idx = torch.arange(t, device=dev).expand(bsz, t)
            prv = torch.where(valid, idx, -1).cummax(1).values
            prv = torch.cat([torch.full((bsz, 1), -1, device=dev, dtype=prv.dtype), prv[:, :-1]], 1)
            start = valid & ((prv < 0) | end.gather(1, prv.clamp(min=0)))
            st = torch.where(start, idx, -1).cummax(1).values.clamp(min=0)  # start token of each token's step
            v_first = v.gather(1, st)
        v_next = torch.where(has_next, v.gather(1, nxt_c), 0.0)
        delta = delta + torch.where(end, gamma * v_next - v_first, 0.0)
    coef = torch.where(end & has_next, gamma * lam, torch.where(end, 0.0, 1.0)).to(dtype)
    return coef, delta, end, k_excl, v_first


def _torch_scan(coef, delta, end, k_excl, gl):
    """Compact steps into [segments, steps-per-segment], run the constant-coefficient suffix sum."""
    bsz, t = delta.shape
    at = end.reshape(-1).nonzero().squeeze(1)
    d_steps = delta.reshape(-1).index_select(0, at)
    n = d_steps.numel()
    last = coef.reshape(-1).index_select(0, at) == 0  # a sequence ends after this step
    seg = last.cumsum(0) - last.long()
    k = torch.arange(n, device=delta.device)
    seg_start = torch.cat([torch.ones(1, dtype=torch.bool, device=delta.device), last[:-1]])
    pos = k - torch.where(seg_start, k, 0).cummax(0).values
    n_seg, s_max = int(seg[-1]) + 1, int(pos.max()) + 1
    flat = seg * s_max + pos
    dense = torch.zeros(n_seg * s_max, device=delta.device, dtype=delta.dtype).index_copy_(0, flat, d_steps)
    a_steps = discounted_suffix_sum(dense.view(n_seg, s_max), gl).reshape(-1).index_select(0, flat)
    return a_steps.index_select(0, k_excl.clamp(max=n - 1)).view(bsz, t)


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
    coef, delta, end, k_excl, v_first = _prepare(
        rewards, valid, step_ids, boundaries, seq_ends, values, float(gamma), float(lam), dtype
    )
    if not bool(end.any()):
        adv = torch.zeros(shape, device=rewards.device, dtype=dtype)
    elif which == "triton":
        from . import _triton_gae as tg

        count_launch("gae_scan")
        adv = tg.reverse_scan(coef.float().contiguous(), delta.float().contiguous(), block_t).to(dtype)
    else:
        adv = _torch_scan(coef, delta, end, k_excl, float(gamma) * float(lam))
    adv = torch.where(valid, adv, 0.0)
    ret = adv if v_first is None else torch.where(valid, adv + v_first, 0.0)
    return adv, ret
