"""Per-token log-probs from vocab-parallel logits, and the loss aggregation the backend scales by.

The kernels engineer's ``scpo_kernels.fused_logprobs`` is used when it is importable; until it lands (or if
its import fails) megatron's ``vocab_parallel_cross_entropy`` (negated) computes the same quantity. Padded
vocab rows (vocab padded to 128*TP) get a very negative logit, never probability mass.
"""

from __future__ import annotations

from typing import Any

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _kernel_fused_logprobs() -> Any:
    try:
        from scpo_kernels import fused_logprobs
    except ImportError:
        return None
    return fused_logprobs if callable(fused_logprobs) else None


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Give this shard's padded vocab columns (global id >= vocab_size) a finite, very negative logit.

    Finite (not -inf) so a shard made only of padding still has a well-defined local max/logsumexp.
    """
    v_local = logits.shape[-1]
    start = tp_rank * v_local
    n_real = max(0, min(v_local, vocab_size - start))
    if n_real == v_local:
        return logits
    out = logits.clone()
    out[..., n_real:] = torch.finfo(logits.dtype).min / 2
    return out


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: Any = None,
    tp_rank: int = 0,
) -> torch.Tensor:
    """out[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) under logits/temperature; out[:, 0] = 0.

    ``logits`` is this TP rank's vocab shard [B, S, V/TP]; the result is fp32 [B, S] on every TP rank.
    """
    b, s, v_local = logits.shape
    if s < 2:
        return torch.zeros(b, s, dtype=torch.float32, device=logits.device)
    shard = mask_padded_vocab(logits[:, :-1], vocab_size, tp_rank)
    targets = input_ids[:, 1:].reshape(-1)
    fused = _kernel_fused_logprobs()
    if fused is not None:
        lp, _ = fused(shard.reshape(-1, v_local), targets, temperature=temperature, tp_group=tp_group)
    else:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        scaled = shard.float() / temperature  # fresh tensor: megatron's CE modifies its input in place
        lp = -vocab_parallel_cross_entropy(scaled.reshape(-1, 1, v_local), targets.reshape(-1, 1)).reshape(-1)
    lp = lp.reshape(b, s - 1).float()
    return torch.cat([torch.zeros(b, 1, dtype=lp.dtype, device=lp.device), lp], dim=1)


def agg_units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """How many units ``agg`` averages over in this (micro-)batch: tokens, non-empty sequences or rows.

    Summing units over micro-batches and DP ranks gives the global normalizer, so that
    sum_mb loss_mb * units_mb / units_global equals the loss of the whole global batch.
    """
    if agg == "token-mean":
        return mask.sum().to(torch.float64)
    if agg == "seq-mean-token-mean":
        return (mask.sum(-1) > 0).sum().to(torch.float64)
    if agg == "seq-mean-token-sum-norm":
        return torch.tensor(float(mask.shape[0]), dtype=torch.float64)
    raise ValueError(f"loss aggregation {agg!r} is not supported; choose one of {list(AGG_MODES)}")


def aggregate(x: torch.Tensor, mask: torch.Tensor, agg: str, norm_length: float | None = None) -> torch.Tensor:
    """Aggregate a per-token quantity [B, T] over ``mask`` the way ``agg`` says (0 for an empty batch).

    Same convention as scpo_kernels.policy_loss (used here for the KL term and the global normalizer).
    """
    m = mask.to(x.dtype)
    if agg == "token-mean":
        return (x * m).sum() / m.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        per_seq = (x * m).sum(-1) / m.sum(-1).clamp(min=1)
        nonempty = (m.sum(-1) > 0).to(x.dtype)
        return (per_seq * nonempty).sum() / nonempty.sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        norm = float(norm_length) if norm_length else float(x.shape[-1])
        return (x * m).sum() / (x.shape[0] * norm)
    raise ValueError(f"loss aggregation {agg!r} is not supported; choose one of {list(AGG_MODES)}")


def _fallback_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: torch.Tensor,
    eps_high: torch.Tensor,
    *,
    dual_clip: float | None = None,
    tis_weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with per-sample clip ranges; used only until scpo_kernels.policy_loss lands."""
    ratio = torch.exp(logprobs - old_logprobs)
    lo = (1.0 - eps_low).unsqueeze(-1)
    hi = (1.0 + eps_high).unsqueeze(-1)
    pg = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, lo, hi))
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    if tis_weights is not None:
        pg = pg * tis_weights
    m = mask.to(pg.dtype)
    n = m.sum().clamp(min=1)
    metrics = {  # same names and definitions as scpo_kernels.policy_loss
        "clipfrac_low": ((advantages < 0) & (ratio < lo)).to(pg.dtype).mul(m).sum() / n,
        "clipfrac_high": ((advantages > 0) & (ratio > hi)).to(pg.dtype).mul(m).sum() / n,
    }
    return aggregate(pg, mask, agg, norm_length), metrics


def policy_loss(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``scpo_kernels.policy_loss`` when available, else the local fallback (same signature)."""
    try:
        from scpo_kernels import policy_loss as kernel_policy_loss
    except ImportError:
        kernel_policy_loss = None
    if not callable(kernel_policy_loss):  # not exported yet (a bare submodule is not the function)
        return _fallback_policy_loss(*args, **kwargs)
    return kernel_policy_loss(*args, **kwargs)
