"""Baseline rewards: accuracy-only, global length penalties (Arora-Zanette, Kimi k1.5), DAPO overlong.

All take flattened groups (``group_ids[B]``) and return float64 sequence rewards [B].
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_scpo.algo.groups import group_index, group_min_max, masked_group_stats


def accuracy_reward(correct: Tensor) -> Tensor:
    """r = S(y): 1 for a verified-correct response, 0 otherwise."""
    return correct.to(torch.float64)


def arora_zanette_reward(
    correct: Tensor, lengths: Tensor, group_ids: Tensor, alpha: float, truncated: Tensor | None = None
) -> Tensor:
    """r = S * (1 - alpha * sigmoid((L - mu_L) / sd_L)), mu/sd over the group's correct responses.

    sd_L = 0 (one correct response, or equal lengths) gives z = 0, i.e. r = 1 - alpha/2 for every
    correct response (a constant that group normalization removes). Samples with ``truncated[B]`` true
    stay out of mu_L, sd_L (their capped length is not a real length) but still get a reward.
    """
    inv, n = group_index(group_ids)
    c = correct.bool()
    L = lengths.to(torch.float64)
    stat = c if truncated is None else c & ~truncated.bool()
    mu, sd, _ = masked_group_stats(L, inv, n, stat)
    z = torch.where(sd[inv] > 0, (L - mu[inv]) / sd[inv].clamp(min=1e-12), torch.zeros_like(L))
    return c.to(torch.float64) * (1.0 - alpha * torch.sigmoid(z))


def kimi_length_reward(correct: Tensor, lengths: Tensor, group_ids: Tensor, weight: float = 1.0) -> Tensor:
    """Kimi k1.5: lam = 0.5 - (L - L_min)/(L_max - L_min) over the group; r = S + w*(lam if S else min(0, lam)).

    A group whose lengths are all equal gets no length term.
    """
    inv, n = group_index(group_ids)
    L = lengths.to(torch.float64)
    lo, hi = group_min_max(L, inv, n)
    span = hi[inv] - lo[inv]
    lam = torch.where(span > 0, 0.5 - (L - lo[inv]) / span.clamp(min=1e-12), torch.zeros_like(L))
    c = correct.bool()
    return c.to(torch.float64) + weight * torch.where(c, lam, lam.clamp(max=0.0))


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment: 0 up to max-cache, linear to -factor at max, -factor beyond."""
    L = lengths.to(torch.float64)
    start = float(max_length - cache_length)
    ramp = (start - L) / float(cache_length)
    pen = torch.where(L <= start, torch.zeros_like(L), torch.where(L <= max_length, ramp, -torch.ones_like(L)))
    return factor * pen
