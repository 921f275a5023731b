"""Per-group statistics over flattened samples: the one home of "mean/std within a prompt's group".

Group ids are arbitrary integers (not necessarily contiguous or sorted); every helper maps them to
0..G-1 first. Statistics of an empty selection are defined as 0 (never NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_finite(name: str, x: Tensor) -> Tensor:
    """Raise ValueError naming ``name`` if ``x`` holds NaN/inf: the project never propagates a silent NaN."""
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains a non-finite value at index {bad}")
    return x


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Arbitrary group ids [B] -> (dense index [B] in 0..G-1, G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
    if group_ids.numel() == 0:
        raise ValueError("empty batch: group_ids has no samples")
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(uniq.numel())


def masked_group_stats(
    values: Tensor, groups: Tensor, num_groups: int, mask: Tensor | None = None, *, unbiased: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, std and count per group of ``values[N]`` restricted to ``mask[N]`` (float64).

    Groups with no selected element get mean 0 and std 0; a single element (unbiased) gets std 0.
    """
    v = values.to(torch.float64).reshape(-1)
    g = groups.reshape(-1)
    m = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    w = m.to(torch.float64)
    v = torch.where(m, v, torch.zeros_like(v))
    cnt = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, g, w)
    s = torch.zeros_like(cnt).index_add_(0, g, v)
    mean = s / cnt.clamp(min=1.0)
    dev = torch.where(m, v - mean[g], torch.zeros_like(v))
    ss = torch.zeros_like(cnt).index_add_(0, g, dev * dev)
    denom = (cnt - 1.0) if unbiased else cnt
    var = torch.where(denom > 0, ss / denom.clamp(min=1.0), torch.zeros_like(ss))
    return mean, var.clamp(min=0.0).sqrt(), cnt


def group_normalize(
    rewards: Tensor, group_ids: Tensor, *, scale_std: bool = True, unbiased: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantage ``(r - mean_g) / (std_g + eps)``; ``scale_std=False`` is Dr.GRPO ``r - mean_g``.

    A group of one sample (or with identical rewards) gets advantage 0. NaN rewards raise.
    """
    check_finite("rewards", rewards)
    inv, n = group_index(group_ids)
    mean, std, _ = masked_group_stats(rewards, inv, n, unbiased=unbiased)
    adv = rewards.to(torch.float64) - mean[inv]
    if scale_std:
        sd = std[inv]
        adv = torch.where(sd > 0, adv / (sd + eps), torch.zeros_like(adv))
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def group_accuracy(correct: Tensor, group_ids: Tensor) -> Tensor:
    """Fraction correct of each sample's group, per sample [B] (float32)."""
    inv, n = group_index(group_ids)
    mean, _, _ = masked_group_stats(correct.to(torch.float64), inv, n)
    return mean[inv].to(torch.float32)


def quantile_linear(values: Tensor, q: float) -> float:
    """numpy.percentile-style linear interpolation (q in [0, 1]) of a non-empty 1-D tensor."""
    if values.numel() == 0:
        raise ValueError("quantile of an empty set")
    v = torch.sort(values.to(torch.float64).reshape(-1)).values
    pos = q * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    frac = pos - lo
    return float(v[lo] + (v[hi] - v[lo]) * frac)


def group_min_max(values: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group min and max of ``values[N]`` (float64); every group must be non-empty."""
    v = values.to(torch.float64).reshape(-1)
    g = groups.reshape(-1)
    lo = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=v.device)
    hi = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=v.device)
    lo = lo.scatter_reduce(0, g, v, reduce="amin")
    hi = hi.scatter_reduce(0, g, v, reduce="amax")
    return lo, hi
