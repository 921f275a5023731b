"""Difficulty-adaptive clip ranges (SCPO component 4, reconstructed).

``eps(q) = eps_min + (eps_max - eps_min) * p(q)`` with p(q) the group accuracy: easy prompts may move
further, hard prompts are protected. ``invert`` uses ``1 - p`` (wider range for hard prompts, for
exploration). Low and high ends are independent, so clip-higher (eps_high > eps_low) is allowed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_scpo.algo.config import ClipConfig
from megatron_scpo.algo.groups import check_finite, group_accuracy


def clip_ranges(accuracy: Tensor, cfg: ClipConfig) -> tuple[Tensor, Tensor]:
    """Per-sample (eps_low [B], eps_high [B]) from per-sample group accuracy in [0, 1]."""
    check_finite("accuracy", accuracy.to(torch.float32))
    if bool(((accuracy < 0) | (accuracy > 1)).any()):
        raise ValueError("accuracy must lie in [0, 1]")
    p = accuracy.to(torch.float32)
    if not cfg.adaptive:
        eps_low, eps_high = cfg.fixed()
        return torch.full_like(p, eps_low), torch.full_like(p, eps_high)
    if cfg.invert:
        p = 1.0 - p
    (lo_min, lo_max), (hi_min, hi_max) = cfg.ranges()
    lo = lo_min + (lo_max - lo_min) * p
    hi = hi_min + (hi_max - hi_min) * p
    return lo, hi


def adaptive_clip(correct: Tensor, group_ids: Tensor, cfg: ClipConfig) -> tuple[Tensor, Tensor]:
    """Per-sample clip ranges from correctness and group membership (the registry's clip policy)."""
    return clip_ranges(group_accuracy(correct, group_ids), cfg)
