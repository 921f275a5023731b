"""Progressive length calibration (SmartThinker-ICML, Hu et al., arXiv 2603.08000).

Per group: all lengths ~ N(mu1, s1^2), correct lengths ~ N(mu2, s2^2); P(correct | l) is proportional
to N(l; mu2, s2^2) / N(l; mu1, s1^2) and its log is quadratic in l:
    s1^2 > s2^2:  concave, maximiser l_opt = (s1^2 mu2 - s2^2 mu1) / (s1^2 - s2^2), clipped to [min L, max L]
    s2^2 > s1^2:  convex, maximiser over [min L, max L] is the endpoint with the larger log-ratio
    s1^2 = s2^2:  monotone, increasing iff mu2 > mu1 -> max L if mu2 > mu1, min L if mu2 < mu1
                  (the authors' sync code has this branch backwards; their async code and we do not)
    all correct -> min L; none correct -> max L.
Deviation: the upstream code always picks min L when s2^2 > s1^2; we evaluate both endpoints (the
true maximiser). Equal variances *and* means (no information) give max L, i.e. no compression.
Reward: d_i = ReLU(l_i - l_opt) for correct i (0 otherwise), r_i = acc_i - Lambda d_i with
Lambda = p_err / (max_correct d - mean d + eps) (0 for all-correct / all-wrong groups or when no
correct response exceeds l_opt).
Truncated responses (cut at the generation limit) are left out of both Gaussians and of the clip
interval (their capped length is not a real length; issue 11 item 2); a group with nothing else gets
l_opt = max L (no compression). p_err, d and Lambda still count every sample.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megatron_scpo.algo.groups import group_index, masked_group_stats

VAR_TIE = 1e-6


def optimal_length(lengths: Tensor, correct: Tensor, variance: Literal["population", "unbiased"] = "population") -> float:
    """l_opt of one group (see module docstring for the branches)."""
    L = lengths.to(torch.float64).reshape(-1)
    c = correct.bool().reshape(-1)
    if L.numel() == 0:
        raise ValueError("optimal_length of an empty group")
    lmin, lmax = float(L.min()), float(L.max())
    if bool(c.all()):
        return lmin
    if not bool(c.any()):
        return lmax
    unbiased = variance == "unbiased"
    Lc = L[c]
    mu1, mu2 = float(L.mean()), float(Lc.mean())
    v1 = float(L.var(unbiased=unbiased)) if L.numel() > 1 else 0.0
    v2 = float(Lc.var(unbiased=unbiased)) if (Lc.numel() > 1 or not unbiased) else 0.0
    if abs(v2 - v1) < VAR_TIE:
        if mu2 > mu1:
            return lmax
        if mu2 < mu1:
            return lmin
        return lmax
    if v1 > v2:
        lopt = (v1 * mu2 - v2 * mu1) / (v1 - v2)
        return min(max(lopt, lmin), lmax)

    def log_ratio(x: float) -> float:  # v2 > v1 >= 0 here, so v2 > 0
        a = -((x - mu2) ** 2) / (2 * v2)
        b = ((x - mu1) ** 2) / (2 * v1) if v1 > 0 else 0.0
        return a + b

    return lmax if log_ratio(lmax) > log_ratio(lmin) else lmin


def calibration_rewards(
    correct: Tensor, lengths: Tensor, group_ids: Tensor, *, variance: Literal["population", "unbiased"] = "population",
    eps: float = 1e-6, truncated: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (r [B], d [B], Lambda per sample [B], l_opt per sample [B]), all float64.

    correct/lengths (tokens)/group_ids/truncated [B]; truncated samples do not shape l_opt (None: none are).
    """
    inv, n = group_index(group_ids)
    c = correct.bool()
    ok = torch.ones_like(c) if truncated is None else ~truncated.bool()
    L = lengths.to(torch.float64)
    lopt_g = torch.zeros(n, dtype=torch.float64)
    for g in range(n):
        sel = inv == g
        use = sel & ok
        lopt_g[g] = optimal_length(L[use], c[use], variance) if bool(use.any()) else float(L[sel].max())
    lopt = lopt_g[inv]
    d = torch.where(c, torch.relu(L - lopt), torch.zeros_like(L))
    acc = c.to(torch.float64)
    p, _, _ = masked_group_stats(acc, inv, n)
    dmean, _, _ = masked_group_stats(d, inv, n)
    dmax = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, inv, d, reduce="amax")
    mixed = (p > 0) & (p < 1) & (dmax > 0)
    lam_g = torch.where(mixed, (1.0 - p) / (dmax - dmean + eps), torch.zeros_like(p))
    lam = lam_g[inv]
    return acc - lam * d, d, lam, lopt


def calibration_advantages(
    rewards: Tensor, correct: Tensor, group_ids: Tensor, *, normalize: Literal["combined", "accuracy"] = "combined",
    eps: float = 1e-6,
) -> Tensor:
    """GRPO normalization of r = acc - Lambda d (float64).

    combined (paper, sync code): (r - mean r) / (std r + eps); correct >= 0 and wrong <= 0 hold by
    construction of Lambda, and the clamp only removes float rounding. accuracy (async code):
    (r - mean acc) / (std acc + eps); no sign guarantee for correct responses.
    """
    inv, n = group_index(group_ids)
    c = correct.bool()
    base = rewards.to(torch.float64) if normalize == "combined" else c.to(torch.float64)
    mean, std, _ = masked_group_stats(base, inv, n, unbiased=True)
    sd = std[inv]
    adv = torch.where(sd > 0, (rewards.to(torch.float64) - mean[inv]) / (sd + eps), torch.zeros_like(sd))
    if normalize == "combined":
        adv = torch.where(c, adv.clamp(min=0.0), adv.clamp(max=0.0))
    return adv
