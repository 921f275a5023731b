"""SCPO step-level length-control reward (SmartThinker-v1, He et al., arXiv 2507.04348) -- RECONSTRUCTED.

Only the survey row of the reward survived (research/papers.md 1.2); the symbols' meaning is ours:
    correct:   r_j = (1 - k1 * sigmoid(lt_j)) * (1 - k2 * sigmoid(nt))
               lt_j = (1 - w_j) * (l_j - mu_l) / sd_l   (mu_l, sd_l over all steps of the group's correct responses)
               nt   = (L - mu_L) / sd_L                 (over the group's correct responses)
    incorrect: r_j = -exp(-rho * (K - j) / k0),  j = 1..K, k0 = K unless configured
so long, unimportant steps lose most; important steps (w ~ 1) keep their length; a wrong response's
penalty concentrates on the steps nearest its wrong conclusion. A zero std gives z = 0 (population std).
Ours: each sd is floored at ``length_sd_floor * mean`` so that +-1 token among near-equal lengths is not
read as a strong length signal.
Truncated responses (cut at the generation limit) never enter mu_l, sd_l, mu_L, sd_L: their capped
length would shift the reference lengths (DESIGN.md 3, issue 11 item 2); they still get a reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_scpo.algo.config import ScpoConfig
from megatron_scpo.algo.groups import check_finite, group_index, masked_group_stats


def _zscore(x: Tensor, mean: Tensor, sd: Tensor) -> Tensor:
    return torch.where(sd > 0, (x - mean) / sd.clamp(min=1e-12), torch.zeros_like(x))


def scpo_step_rewards(
    step_lengths: Tensor,
    step_mask: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    importance: Tensor,
    total_lengths: Tensor,
    cfg: ScpoConfig,
    truncated: Tensor | None = None,
) -> Tensor:
    """Step rewards [B, K] (float64, 0 on padding; correct in [(1-k1)(1-k2), 1], wrong in [-1, 0)).

    step_lengths/step_mask/importance [B, K] (importance w in [0, 1], only read for correct samples);
    total_lengths [B] is L (response tokens); truncated [B] bool marks samples kept out of the length
    statistics (None: none). Raises ValueError on NaN or out-of-range importance.
    """
    mask = step_mask.bool()
    c = correct.bool()
    w = torch.where(mask & c[:, None], importance.to(torch.float64), torch.zeros_like(step_lengths, dtype=torch.float64))
    check_finite("step importance", w)
    if bool(((w < 0) | (w > 1)).any()):
        raise ValueError("step importance must lie in [0, 1]")
    inv, n = group_index(group_ids)
    lj = step_lengths.to(torch.float64)
    gid = inv[:, None].expand_as(lj)
    stat = c if truncated is None else c & ~truncated.bool()
    step_sel = mask & stat[:, None]
    mu_l, sd_l, _ = masked_group_stats(lj, gid, n, step_sel)
    L = total_lengths.to(torch.float64)
    mu_L, sd_L, _ = masked_group_stats(L, inv, n, stat)
    f = cfg.length_sd_floor
    lt = (1.0 - w) * _zscore(lj, mu_l[gid], torch.maximum(sd_l, f * mu_l)[gid])
    nt = _zscore(L, mu_L[inv], torch.maximum(sd_L, f * mu_L)[inv])
    r_correct = (1.0 - cfg.k1 * torch.sigmoid(lt)) * (1.0 - cfg.k2 * torch.sigmoid(nt))[:, None]

    K = mask.sum(dim=1).to(torch.float64)  # steps are contiguous from 0
    j = torch.arange(1, lj.shape[1] + 1, dtype=torch.float64)[None, :]
    k0 = torch.full_like(K, float(cfg.k0)) if cfg.k0 is not None else K.clamp(min=1.0)
    r_wrong = -torch.exp(-cfg.rho * (K[:, None] - j) / k0[:, None])
    out = torch.where(c[:, None], r_correct, r_wrong)
    return torch.where(mask, out, torch.zeros_like(out))
