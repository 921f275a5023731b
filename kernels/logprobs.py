"""Per-token log-probs (+ entropy) over a large, possibly vocab-parallel, vocabulary.

Never materializes log_softmax: the forward is one pass with an online logsumexp producing per-row
partials (max m, sum-exp s, sum-exp*z t, target logit z_t); the backward recomputes p = exp(z - lse)
tile by tile. With ``tp_group`` each rank holds a contiguous vocab shard; only the [N] partials are
all-reduced and the backward is local. Temperature T: z = logits / T.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._dispatch import (
    Impl,
    NonFiniteError,
    check_contiguous,
    check_float,
    check_same_device,
    count_launch,
    resolve_impl,
)

#: Elements per fp32 tile of the torch path (1 MiB, cache-resident): extra memory is a few tiles.
TILE_ELEMS = 1 << 18


# ----------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------
def _safe_max(m: torch.Tensor) -> torch.Tensor:
    """Max used as the exp shift: 0 where a row is all -inf, so exp(-inf - shift) = 0, never NaN."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _merge(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, xt: torch.Tensor, dim: int = -1):
    """Merge partials along ``dim`` (splits): rescale every sum to the common max."""
    mm = m.amax(dim, keepdim=True)
    w = torch.exp(m - _safe_max(mm))
    return mm.squeeze(dim), (s * w).sum(dim), (t * w).sum(dim), xt.sum(dim)


def _tp_combine(m, s, t, xt, group):
    """All-reduce the per-row partials of each vocab shard (MAX of m, then one SUM of 3 rows)."""
    mm = m.clone()
    dist.all_reduce(mm, op=dist.ReduceOp.MAX, group=group)
    w = torch.exp(m - _safe_max(mm))
    buf = torch.stack([s * w, t * w, xt])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return mm, buf[0], buf[1], buf[2]


def _finish(m, s, t, xt, ignored: torch.Tensor, with_entropy: bool):
    """lse, log-prob, entropy from merged stats; refuse non-finite results (bad logits) loudly."""
    lse = m + torch.log(s)
    logp = torch.where(ignored, torch.zeros_like(xt), xt - lse)
    ent = lse - t / s if with_entropy else None
    bad = ~torch.isfinite(lse) | ~torch.isfinite(logp) | (logp > 1e-3)
    if with_entropy:
        bad |= ~torch.isfinite(ent)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"fused_logprobs: non-finite or positive result at row {row} (lse={lse[row].item()}, "
            f"logp={logp[row].item()}): logits contain NaN/inf or a target logit is -inf"
        )
    return lse, logp, ent


def _row_block(chunk: int) -> int:
    return max(1, TILE_ELEMS // max(chunk, 1))


def _tp_info(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------------------------------
# torch path (CPU production path): tiled over rows and vocab, fp32 math
# ----------------------------------------------------------------------------------------------------
def _tile_update(z: torch.Tensor, m, s, t, with_entropy: bool):
    """Online-logsumexp update of (m, s, t) [R] with one fp32 tile z [R, C] (z is consumed in place)."""
    m_new = torch.maximum(m, z.amax(1))
    shift = _safe_max(m_new)
    scale = torch.exp(m - shift)
    z.sub_(shift[:, None])  # y = z - shift
    if with_entropy:
        z.clamp_(min=-1e30)  # y = -inf (logit -inf) would give 0 * inf below
        e = torch.exp(z)
        s_tile = e.sum(1)
        t_tile = e.mul_(z).sum(1) + shift * s_tile  # sum e^y * z = sum e^y * y + shift * sum e^y
        t = t * scale + t_tile
    else:
        s_tile = z.exp_().sum(1)
    return m_new, s * scale + s_tile, t


def _load_tile(buf: torch.Tensor, x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """fp32 copy of a logits tile into a reused buffer (no fresh pages per tile), scaled by 1/T."""
    z = buf[: x.numel()].view(x.shape)
    z.copy_(x)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _torch_partials(x, targets, vocab_start, inv_temp, with_entropy, chunk):
    n, v = x.shape
    dev = x.device
    m = torch.full((n,), -math.inf, device=dev)
    s = torch.zeros(n, device=dev)
    t = torch.zeros(n, device=dev)
    chunk = min(chunk, v)
    rb = _row_block(chunk)
    buf = torch.empty(min(n, rb) * chunk, device=dev)
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        mr, sr, tr = m[r0:r1], s[r0:r1], t[r0:r1]
        for v0 in range(0, v, chunk):
            z = _load_tile(buf, x[r0:r1, v0:v0 + chunk], inv_temp)
            mr, sr, tr = _tile_update(z, mr, sr, tr, with_entropy)
        m[r0:r1], s[r0:r1], t[r0:r1] = mr, sr, tr
    loc = targets - vocab_start
    here = (loc >= 0) & (loc < v)
    xt = x.gather(1, loc.clamp(0, v - 1)[:, None]).squeeze(1).float() * inv_temp
    return m, s, t, torch.where(here, xt, torch.zeros_like(xt))


def _torch_backward(x, grad, targets, lse, ent, g_lp, g_ent, vocab_start, inv_temp, chunk):
    """grad = [g_lp*(onehot - p) - g_ent*p*(log p + H)] / T per tile, fp32 math, one cast at the store."""
    n, v = x.shape
    loc = targets - vocab_start
    chunk = min(chunk, v)
    rb = _row_block(chunk)
    buf = torch.empty(min(n, rb) * chunk, device=x.device)
    buf2 = torch.empty_like(buf) if g_ent is not None else None
    for r0 in range(0, n, rb):
        r1 = min(n, r0 + rb)
        lse_r, glp_r = lse[r0:r1, None], g_lp[r0:r1, None]
        if g_ent is not None:
            gent_r = g_ent[r0:r1, None]
            const_r = glp_r + gent_r * ent[r0:r1, None]
        loc_r = loc[r0:r1]
        for v0 in range(0, v, chunk):
            v1 = min(v, v0 + chunk)
            g = _load_tile(buf, x[r0:r1, v0:v1], inv_temp).sub_(lse_r)  # log p
            if g_ent is None:
                g.exp_().mul_(-glp_r)
            else:
                p = torch.exp(g, out=buf2[: g.numel()].view(g.shape))
                g.clamp_(min=-1e30)  # log p = -inf where p = 0: avoid 0 * inf
                g.mul_(gent_r).add_(const_r).mul_(p).neg_()  # -p * (g_lp + g_ent * (log p + H))
            rows = ((loc_r >= v0) & (loc_r < v1)).nonzero().squeeze(1)
            if rows.numel():
                g[rows, loc_r[rows] - v0] += glp_r[rows, 0]
            if inv_temp != 1.0:
                g.mul_(inv_temp)
            grad[r0:r1, v0:v1] = g  # casts to the logits dtype once, after fp32 math


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temp, with_entropy, group, impl, ignore_index, chunk, block_v, splits,
                inplace_backward):
        rank, _ = _tp_info(group)
        vocab_start = rank * logits.shape[1]
        ignored = targets == ignore_index
        if impl == "triton":
            from . import _triton_logprobs as tk

            count_launch("logprobs_fwd")
            parts = tk.lse_partials(logits, targets, vocab_start, inv_temp, with_entropy, block_v, splits)
            m, s, t, xt = _merge(*parts)
        else:
            m, s, t, xt = _torch_partials(logits, targets, vocab_start, inv_temp, with_entropy, chunk)
        if group is not None:
            m, s, t, xt = _tp_combine(m, s, t, xt, group)
        lse, logp, ent = _finish(m, s, t, xt, ignored, with_entropy)
        ctx.save_for_backward(logits, targets, lse, ent if with_entropy else lse)
        ctx.cfg = (inv_temp, with_entropy, vocab_start, impl, ignore_index, chunk, block_v, inplace_backward)
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        logits, targets, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, vocab_start, impl, ignore_index, chunk, block_v, inplace = ctx.cfg
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float()
        g_lp = torch.where(targets == ignore_index, torch.zeros_like(g_lp), g_lp).contiguous()
        g_ent = g_ent.float().contiguous() if (with_entropy and g_ent is not None) else None
        ent = ent if g_ent is not None else None
        grad = logits.detach() if inplace else torch.empty_like(logits)
        with torch.no_grad():
            if impl == "triton":
                from . import _triton_logprobs as tk

                count_launch("logprobs_bwd")
                tk.logprob_backward(logits, grad, targets, lse, ent, g_lp, g_ent, vocab_start, inv_temp, block_v)
            else:
                _torch_backward(logits, grad, targets, lse, ent, g_lp, g_ent, vocab_start, inv_temp, chunk)
        return grad, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# validation + public API
# ----------------------------------------------------------------------------------------------------
def _check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return 1.0 / float(temperature)


def _check_targets(targets: torch.Tensor, n: int, v_global: int, ignore_index: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected ({n},) to match logits rows")
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= v_global)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is out of range [0, {v_global}) (ignore_index={ignore_index})"
        )


def fused_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    impl: Impl = "auto",
    ignore_index: int = -100,
    chunk_size: int = 8192,
    block_v: int = 4096,
    splits: int | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` under softmax(logits / temperature), and optionally the entropy.

    logits: [N, V_local] any float dtype (math in fp32); with ``tp_group`` this rank's contiguous vocab
    shard [rank*V_local, (rank+1)*V_local). targets: [N] global ids; ``ignore_index`` rows get logp 0 and
    no gradient (their entropy is still computed). Returns (logp [N] fp32, entropy [N] fp32 or None);
    both are differentiable. ``chunk_size``: torch-path vocab tile; ``block_v``/``splits``: Triton tile
    (power of 2) and vocab splits per row. ``inplace_backward`` writes the logits gradient into the
    logits buffer (saves one [N, V] tensor; only when nothing else needs the logits afterwards).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [N, V], got {getattr(logits, 'shape', type(logits))}")
    check_float("logits", logits)
    n, v_local = logits.shape
    if n == 0 or v_local == 0:
        raise ValueError(f"fused_logprobs: empty input, logits has shape {tuple(logits.shape)}")
    check_same_device({"logits": logits, "targets": targets})
    inv_temp = _check_temperature(temperature)
    _, world = _tp_info(tp_group)
    _check_targets(targets, n, v_local * world, ignore_index)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    which = resolve_impl(impl, logits)
    if which == "triton":
        if block_v <= 0 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of 2, got {block_v}")
        if logits.stride(1) != 1:
            raise ValueError(f"logits must have a contiguous last dim for impl='triton', got strides {logits.stride()}")
        check_contiguous({"targets": targets})
        if splits is None:
            splits = 1 if n >= 1024 else max(1, min(16, math.ceil(v_local / (8 * block_v))))
    out = _FusedLogProbs.apply(
        logits, targets.long() if which == "torch" else targets, inv_temp, return_entropy, tp_group, which,
        ignore_index, chunk_size, block_v, splits or 1, inplace_backward,
    )
    if return_entropy:
        return out[0], out[1]
    return out, None


# ----------------------------------------------------------------------------------------------------
# hidden x LM-head, chunked over the vocab (never materializes [N, V] logits)
# ----------------------------------------------------------------------------------------------------
class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, group, ignore_index, chunk, reduce_grad_hidden):
        rank, _ = _tp_info(group)
        v_local = weight.shape[0]
        vocab_start = rank * v_local
        n = hidden.shape[0]
        dev = hidden.device
        m = torch.full((n,), -math.inf, device=dev)
        s = torch.zeros(n, device=dev)
        t = torch.zeros(n, device=dev)
        xt = torch.zeros(n, device=dev)
        loc = targets - vocab_start
        for v0 in range(0, v_local, chunk):
            v1 = min(v_local, v0 + chunk)
            z = (hidden @ weight[v0:v1].T).float()
            if inv_temp != 1.0:
                z *= inv_temp
            rows = ((loc >= v0) & (loc < v1)).nonzero().squeeze(1)
            xt[rows] = z[rows, loc[rows] - v0]
            m, s, t = _tile_update(z, m, s, t, with_entropy)  # consumes z
        if group is not None:
            m, s, t, xt = _tp_combine(m, s, t, xt, group)
        lse, logp, ent = _finish(m, s, t, xt, targets == ignore_index, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.cfg = (inv_temp, with_entropy, vocab_start, ignore_index, chunk, group, reduce_grad_hidden)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, vocab_start, ignore_index, chunk, group, reduce_grad_hidden = ctx.cfg
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float()
        g_lp = torch.where(targets == ignore_index, torch.zeros_like(g_lp), g_lp)
        g_ent = g_ent.float() if (with_entropy and g_ent is not None) else None
        v_local = weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.empty_like(weight)
        with torch.no_grad():
            for v0 in range(0, v_local, chunk):
                v1 = min(v_local, v0 + chunk)
                w = weight[v0:v1]
                z = (hidden @ w.T).float()
                dz = torch.empty_like(z)
                # reuse the logits-tile backward on the recomputed tile (targets shifted into the tile)
                _torch_backward(z, dz, targets, lse, ent if g_ent is not None else None, g_lp, g_ent,
                                vocab_start + v0, inv_temp, v1 - v0)
                dz = dz.to(hidden.dtype)
                grad_h += (dz @ w).float()
                grad_w[v0:v1] = dz.T @ hidden
            if group is not None and reduce_grad_hidden:
                dist.all_reduce(grad_h, group=group)
        return grad_h.to(hidden.dtype), grad_w, None, None, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    return_entropy: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduce_grad_hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (+ entropy) of ``targets`` under softmax(hidden @ weight.T / temperature), chunked.

    Not on the training path yet (the backend's output layer produces logits, then ``fused_logprobs``);
    tested and benchmarked only (benchmarks/bench_kernels.py). Torch path only (no Triton kernel).

    hidden [N, H] (replicated across TP ranks), weight [V_local, H] (this rank's vocab shard, no bias).
    Extra memory is O(N * chunk_size) in forward and backward (the backward recomputes each logits
    chunk). With ``tp_group`` the hidden gradient is all-reduced over the group unless
    ``reduce_grad_hidden=False`` (set that when the caller's own region op, e.g. Megatron's
    ``copy_to_tensor_model_parallel_region``, already reduces it). Torch path on every device.
    """
    for name, tns in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tns, torch.Tensor) or tns.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(tns, 'shape', type(tns))}")
        check_float(name, tns)
    n, h = hidden.shape
    if n == 0 or weight.shape[0] == 0:
        raise ValueError(f"linear_logprobs: empty input, hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[1] != h:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [V_local, {h}] to match hidden")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    check_same_device({"hidden": hidden, "weight": weight, "targets": targets})
    inv_temp = _check_temperature(temperature)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    _, world = _tp_info(tp_group)
    _check_targets(targets, n, weight.shape[0] * world, ignore_index)
    out = _LinearLogProbs.apply(hidden, weight, targets.long(), inv_temp, return_entropy, tp_group, ignore_index,
                                chunk_size, reduce_grad_hidden)
    if return_entropy:
        return out[0], out[1]
    return out, None
