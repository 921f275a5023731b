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
Triton scans that per row. The torch path (CPU production) never scans tokens: the advantage is
constant within a step, so it reduces rewards to steps (one ``segment_reduce`` over runs), runs a
blocked constant-coefficient discounted suffix sum over [sequences, steps] (K << T; two small matmuls
per level, powers formed directly so gamma*lam = 0.5 underflows instead of overflowing), and
broadcasts back once. Token-level GAE skips the step bookkeeping and runs that suffix sum on [B, T].
Rows with masked holes are left-aligned first (see ``_torch_gae``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._dispatch import (
    Impl,
    NonFiniteError,
    check_2d,
    check_float,
    check_same_device,
    count_launch,
    resolve_impl,
)

_SCAN_BLOCK = 64
_DENSE_BLOCK = 32  # fastest block for the [B, T] token scan on CPU (fewer matmul flops, 2 levels)
_HORNER_MAX = 128  # fp64 token-level rows up to this wide: the column recurrence (see _token_scan)


def _horner_suffix_sum(d: torch.Tensor, g: float) -> torch.Tensor:
    """``acc = d[:, i] + g * acc`` from the last column back: the spec's operation order (one add, one mul each)."""
    out = torch.empty_like(d)
    acc = torch.zeros_like(d[:, 0])
    for i in range(d.shape[1] - 1, -1, -1):
        acc = d[:, i] + g * acc
        out[:, i] = acc
    return out


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
    x = d.reshape(r, nb, block) if s == nb * block else torch.nn.functional.pad(d, (0, nb * block - s)).view(r, nb, block)
    out = x @ gm.T  # suffix sums within each block
    carry = discounted_suffix_sum(out[:, :, 0].contiguous(), g**block, block)  # whole suffix from each block start
    tail = torch.pow(torch.tensor(g, dtype=torch.float64), block - e).to(d.dtype)  # g^(block - i)
    out[:, :-1].addcmul_(carry[:, 1:, None], tail)  # plus the discounted suffix after the block
    return out.view(r, nb * block)[:, :s]


class _Steps(NamedTuple):
    """Run/step decomposition of the flat [B*T] layout (see ``_decompose``)."""

    lens: torch.Tensor  # [R] run lengths; runs tile the flat layout in order
    vr: torch.Tensor  # [Rv] indices of the valid runs
    step_of_vr: torch.Tensor  # [Rv] step index of each valid run
    last_tok: torch.Tensor  # [S] flat position of each step's last valid token
    delta: torch.Tensor  # [S] delta_j
    has_next: torch.Tensor  # [S] the step's chain continues with step j+1
    v_first: torch.Tensor | None  # [S] V_j (critic mode)


def _decompose(rewards, valid, step_ids, boundaries, seq_ends, values, gamma, dtype) -> _Steps | None:
    """Reduce tokens to steps with O(1) full-size passes; all the bookkeeping happens on runs.

    A *run* is a maximal stretch of the flat layout that is all-valid or all-masked, does not cross a
    row, a step change or a sequence end. Runs tile the layout, so rewards are reduced by one
    ``segment_reduce`` and a per-run value is broadcast back to tokens by one ``repeat_interleave``:
    the only token-sized work is a few boolean shifts, one nonzero, one reduction and the broadcasts
    (plus one int compare for ``step_ids``). Steps are then the valid runs, merged across masked holes when the
    step id / boundary says the step continues; that merging and the chain links are run-sized.
    """
    bsz, t = valid.shape
    n = valid.numel()
    start = torch.empty((bsz, t), dtype=torch.bool, device=valid.device)
    start[:, 0] = True
    torch.ne(valid[:, 1:], valid[:, :-1], out=start[:, 1:])
    inner = start[:, 1:]
    if step_ids is not None:
        inner |= (step_ids[:, 1:] != step_ids[:, :-1]) & valid[:, 1:]
    elif boundaries is not None:
        inner |= boundaries[:, :-1] & valid[:, :-1] & valid[:, 1:]
    else:  # token level: every valid token is its own step
        start |= valid
    if seq_ends is not None:
        inner |= seq_ends[:, :-1]
    pos = start.view(-1).nonzero().squeeze(1)
    lens = torch.diff(pos, append=pos.new_full((1,), n))
    run_sum = torch.segment_reduce(rewards.reshape(-1).to(dtype), "sum", lengths=lens, unsafe=True)
    vr = valid.reshape(-1).index_select(0, pos).nonzero().squeeze(1)
    if vr.numel() == 0:  # no valid token at all
        return None
    first = pos.index_select(0, vr)
    last = first + lens.index_select(0, vr) - 1
    # consecutive valid runs a -> b belong to one sequence (linked) unless a row or a seq_end lies between
    linked = torch.div(first[1:], t, rounding_mode="floor") == torch.div(first[:-1], t, rounding_mode="floor")
    if seq_ends is not None:
        cut = seq_ends.reshape(-1).index_select(0, pos + lens - 1).long()
        ccut = cut.cumsum(0)
        linked &= ccut.index_select(0, vr[1:] - 1) == ccut.index_select(0, vr[:-1]) - cut.index_select(0, vr[:-1])
    if step_ids is not None:  # adjacent runs always differ; across a masked hole the ids decide
        sid = step_ids.reshape(-1)
        new_step = sid.index_select(0, first[1:]) != sid.index_select(0, last[:-1])
    elif boundaries is not None:
        new_step = boundaries.reshape(-1).index_select(0, last[:-1])
    else:
        new_step = torch.ones_like(linked)
    step_start = torch.ones(vr.numel(), dtype=torch.bool, device=vr.device)
    step_start[1:] = new_step | ~linked
    step_of_vr = step_start.cumsum(0) - 1
    n_steps = int(step_of_vr[-1]) + 1
    vsum = run_sum.index_select(0, vr)
    delta = vsum if n_steps == vr.numel() else torch.zeros(n_steps, device=vr.device, dtype=dtype).index_add_(
        0, step_of_vr, vsum
    )
    step_end = torch.ones_like(step_start)
    step_end[:-1] = step_start[1:]
    has_next = torch.zeros_like(step_start)
    has_next[:-1] = linked
    has_next = has_next[step_end]
    v_first = None
    if values is not None:
        v_first = values.reshape(-1).index_select(0, first[step_start]).to(dtype)
        v_next = torch.zeros_like(v_first)
        v_next[:-1] = v_first[1:]
        delta = delta + torch.where(has_next, gamma * v_next, 0.0) - v_first
    return _Steps(lens, vr, step_of_vr, last[step_end], delta, has_next, v_first)


def _broadcast(per_step: torch.Tensor, st: _Steps, shape: tuple[int, int]) -> torch.Tensor:
    """Per-step values -> [B, T] tokens (0 on masked tokens) through the runs: one full-size pass."""
    per_run = per_step.new_zeros(st.lens.numel())
    per_run[st.vr] = per_step.index_select(0, st.step_of_vr)
    return per_run.repeat_interleave(st.lens, output_size=shape[0] * shape[1]).view(shape)


def _check_finite(name: str, x: torch.Tensor, valid: torch.Tensor) -> None:
    """NaN/inf on valid tokens is an error; garbage on masked tokens is allowed."""
    if bool(torch.isfinite(x.sum())):  # fast path: everything finite (an overflowing sum falls through)
        return
    if not bool(torch.isfinite(x).logical_or_(~valid).all()):
        raise NonFiniteError(f"{name} contains NaN/inf on valid (mask=1) tokens")


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


def _no_holes(valid: torch.Tensor) -> bool:
    """True when each row's valid tokens form one contiguous run (left/right padding only)."""
    rising = (valid[:, 1:] & ~valid[:, :-1]).sum(1) + valid[:, 0]
    return bool((rising <= 1).all())


def _token_scan(r: torch.Tensor, v: torch.Tensor | None, gamma: float, gl: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE on [B, T] rows whose valid tokens are consecutive: one discounted suffix sum.

    ``r``/``v`` must be 0 on padding. Every valid token's successor is the next column, so padding
    after a row's tokens (delta = 0) adds nothing; the caller zeroes outputs on padding before them.
    """
    delta = r if v is None else r - v
    if v is not None:
        delta[:, :-1].add_(v[:, 1:], alpha=gamma)
    if delta.dtype == torch.float64 and delta.shape[1] <= _HORNER_MAX:
        # S-GAE's step grids (step_discounted_sum, the algo's dtype): the column recurrence is as fast at this
        # width and adds in the order of the spec (megatron_scpo.algo.advantages.discounted_reverse_sum), so the
        # step scan the trainer runs is bitwise equal to it
        adv = _horner_suffix_sum(delta, gl)
    else:
        adv = discounted_suffix_sum(delta, gl, _DENSE_BLOCK)
    return adv, (adv.clone() if v is None else adv + v)


def _torch_gae(rewards, valid, step_ids, boundaries, seq_ends, values, gamma: float, gl: float, dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU production path: the cheapest exact formulation for the batch's layout.

    * Masked holes inside rows (no packing): left-align every row's valid tokens (one cumsum, one
      scatter per input, one gather per output) and solve the hole-free problem: the same steps, and
      far fewer runs than holes would cut.
    * Token level, no packing: one discounted suffix sum over the padded [B, T] layout.
    * Otherwise: steps from runs (``_decompose``) and a step-level scan.
    """
    bsz, t = valid.shape
    if seq_ends is None and not _no_holes(valid):
        dest = valid.cumsum(1).mul_(valid)  # 1 + left-aligned column of each valid token; masked -> spare column 0

        def compact(x: torch.Tensor | None, dt: torch.dtype | None = None) -> torch.Tensor | None:
            if x is None:
                return None
            out = torch.zeros(bsz, t + 1, device=x.device, dtype=dt or x.dtype)
            return out.scatter_(1, dest, x.to(out.dtype))[:, 1:]

        def expand(x: torch.Tensor) -> torch.Tensor:  # spare column = 0 -> masked tokens get 0
            return torch.nn.functional.pad(x, (1, 0)).gather(1, dest)

        cvalid = torch.arange(t, device=valid.device) < valid.sum(1, keepdim=True)
        adv, ret = _torch_gae(compact(rewards, dtype), cvalid, compact(step_ids), compact(boundaries), None,
                              compact(values, dtype), gamma, gl, dtype)
        adv = expand(adv)
        return adv, (adv.clone() if values is None else expand(ret))
    if step_ids is None and boundaries is None and seq_ends is None:
        v = None if values is None else torch.where(valid, values.to(dtype), 0.0)
        adv, ret = _token_scan(torch.where(valid, rewards.to(dtype), 0.0), v, gamma, gl)
        if not bool(valid[:, 0].all()):  # left padding (or empty rows) collects the row's sum: zero it
            adv.masked_fill_(~valid, 0.0)
            ret.masked_fill_(~valid, 0.0)
        return adv, ret
    st = _decompose(rewards, valid, step_ids, boundaries, seq_ends, values, gamma, dtype)
    if st is None:
        adv = torch.zeros(bsz, t, device=rewards.device, dtype=dtype)
        return adv, adv.clone()
    adv = _broadcast(_segmented_discount(st.delta, st.has_next, gl), st, (bsz, t))
    return adv, (adv.clone() if st.v_first is None else adv + _broadcast(st.v_first, st, (bsz, t)))


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
        if tns is not None:
            _check_finite(name, tns, valid)
    which = resolve_impl(impl, rewards)
    if which == "triton" and (block_t <= 0 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of 2, got {block_t}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    gl = float(gamma) * float(lam)
    bnd = None if boundaries is None else boundaries.bool()
    ends = None if seq_ends is None else seq_ends.bool()
    if which == "torch":
        return _torch_gae(rewards, valid, step_ids, bnd, ends, values, float(gamma), gl, dtype)
    st = _decompose(rewards, valid, step_ids, bnd, ends, values, float(gamma), dtype)
    if st is None:
        adv = torch.zeros(shape, device=rewards.device, dtype=dtype)
        return adv, adv.clone()
    from . import _triton_gae as tg

    count_launch("gae_scan")
    coef = torch.ones(rewards.numel(), device=rewards.device)
    coef[st.last_tok] = torch.where(st.has_next, gl, 0.0).float()
    b = torch.zeros(rewards.numel(), device=rewards.device)
    b[st.last_tok] = st.delta.float()
    adv = tg.reverse_scan(coef.view(shape), b.view(shape), block_t).to(dtype).masked_fill_(~valid, 0.0)
    return adv, (adv.clone() if st.v_first is None else adv + _broadcast(st.v_first, st, shape))


def step_discounted_sum(
    x: torch.Tensor, step_mask: torch.Tensor, decay: float, *, reduce: str = "sum", impl: Impl = "auto"
) -> torch.Tensor:
    """S-GAE's scan on a step grid: ``out_j = sum_{m >= j, valid} decay^(m-j) x_m`` per row of x [B, K].

    The scan the trainer's SCPO method runs (``build_method(..., scan=step_discounted_sum)``); its spec is
    ``megatron_scpo.algo.advantages.discounted_reverse_sum``, same signature and semantics. Each step is one
    element of ``segmented_gae``'s token-level mode (gamma 1, lam ``decay``). ``reduce="mean"`` divides by
    the same scan of the mask (``sum decay^(m-j)`` over valid m, clamped at 1e-12). x float [B, K];
    step_mask bool/0-1 [B, K] whose valid steps are contiguous from column 0 in every row (else ValueError).
    Returns [B, K] (fp64 for fp64 x, else fp32), 0 on padding. torch path: bitwise equal to the spec in fp64
    for K <= 128 (the token scan's column recurrence); Triton (CUDA tensors): fp32 scan.
    """
    check_2d("x", x)
    check_2d("step_mask", step_mask, tuple(x.shape))
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    valid = step_mask.bool()
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("step_mask: valid steps must be contiguous from column 0 in every row")
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                           device=x.device)
    out, _ = segmented_gae(x, valid, gamma=1.0, lam=decay, impl=impl)
    if reduce == "mean":
        weight, _ = segmented_gae(valid.to(out.dtype), valid, gamma=1.0, lam=decay, impl=impl)
        out = out / weight.clamp(min=1e-12)
    return out
