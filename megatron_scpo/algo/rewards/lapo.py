"""LAPO (Wu et al., arXiv 2507.15758): length-band reward, median length map, budget prompt, Gaussian reward.

Stage 1 (Discovery):  R_D = C + alpha * R_1, R_1 = 1 inside [P30, P70] of the group's correct lengths,
max(0, 1 - d/100) outside (d = distance to the nearer band edge), 0 for wrong answers; the band needs
two distinct correct lengths (P30 < P70), as in the authors' code. M(q) = median of correct lengths.
Stage 2 (Internalization): the prompt gets "I will answer the question with {n} tokens." right after
``<think>``; R_I = C + beta * C * exp(-(L - n)^2 / (2 sigma^2)); M(q) refined by the dual rule (Eq. 8).
Percentiles/median use numpy's linear interpolation. Truncated responses (cut at the generation limit)
never define the band, the map or the stage-2 group target (their capped length is not a real length;
issue 11 item 2); they are still rewarded against the band/target of the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from megatron_scpo.algo.groups import quantile_linear


class LengthMap:
    """Problem -> target length M(q); unsolved prompts (absent keys) get ``default_budget``.

    Serializable (``state_dict``/``load_state_dict``) so it survives checkpoints and moves from
    stage 1 to stage 2.
    """

    def __init__(self, default_budget: int = 4096) -> None:
        self.default_budget = int(default_budget)
        self._m: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._m)

    def __contains__(self, key: str) -> bool:
        return key in self._m

    def is_solved(self, key: str) -> bool:
        return key in self._m

    def get(self, key: str) -> float:
        """Raw median (float) or the default budget."""
        return self._m.get(key, float(self.default_budget))

    def budget(self, key: str) -> int:
        """The integer n written into the stage-2 prompt."""
        return int(round(self.get(key)))

    def set_stage1(self, key: str, correct_lengths: Sequence[float]) -> None:
        """Stage 1: M(q) = median of this step's correct lengths; no correct answer marks q unsolved."""
        if len(correct_lengths) == 0:
            self._m.pop(key, None)
        else:
            self._m[key] = quantile_linear(torch.tensor(list(correct_lengths), dtype=torch.float64), 0.5)

    def refine(self, key: str, correct_lengths: Sequence[float]) -> None:
        """Stage 2 dual rule: unsolved -> median; solved -> min(M(q), median); no correct answer -> unchanged."""
        if len(correct_lengths) == 0:
            return
        med = quantile_linear(torch.tensor(list(correct_lengths), dtype=torch.float64), 0.5)
        self._m[key] = med if key not in self._m else min(self._m[key], med)

    def state_dict(self) -> dict[str, Any]:
        return {"default_budget": self.default_budget, "medians": dict(self._m)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if not isinstance(d, dict) or "medians" not in d or not isinstance(d["medians"], dict):
            raise ValueError("LengthMap state must be a dict with a 'medians' mapping")
        medians = {}
        for k, v in d["medians"].items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"LengthMap state: median of {k!r} must be a finite number >= 0, got {v!r}")
            medians[str(k)] = float(v)
        self.default_budget = int(d.get("default_budget", self.default_budget))
        self._m = medians


def band_bonus(length: float, lo: float, hi: float, decay_width: float) -> float:
    """R_1 of a correct response: 1 inside [lo, hi], linear decay to 0 at ``decay_width`` outside."""
    if lo <= length <= hi:
        return 1.0
    d = min(abs(length - lo), abs(length - hi))
    return max(0.0, 1.0 - d / decay_width)


def lapo_stage1_rewards(
    correct: Tensor, lengths: Tensor, group_ids: Tensor, *, alpha: float, low_pct: float, high_pct: float,
    decay_width: float, truncated: Tensor | None = None,
) -> tuple[Tensor, dict[int, tuple[float, float] | None]]:
    """R_D per sample [B] (float64) and the band (P_low, P_high) per group id (None without a band).

    correct/lengths/group_ids/truncated [B]; the band uses the correct, non-truncated lengths (tokens).
    """
    c = correct.bool()
    stat = c if truncated is None else c & ~truncated.bool()
    L = lengths.to(torch.float64)
    out = c.to(torch.float64).clone()
    bands: dict[int, tuple[float, float] | None] = {}
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero().flatten()
        cl = L[idx][stat[idx]]
        band = None
        if cl.numel() >= 1:
            lo, hi = quantile_linear(cl, low_pct / 100.0), quantile_linear(cl, high_pct / 100.0)
            band = (lo, hi) if lo < hi else None
        bands[int(g)] = band
        if band is None:
            continue
        for i in idx.tolist():
            if c[i]:
                out[i] += alpha * band_bonus(float(L[i]), band[0], band[1], decay_width)
    return out, bands


def lapo_stage2_rewards(correct: Tensor, lengths: Tensor, targets: Tensor, *, beta: float, sigma: float) -> Tensor:
    """R_I = C + beta * C * exp(-(L - n)^2 / (2 sigma^2)) per sample (float64)."""
    c = correct.to(torch.float64)
    d = lengths.to(torch.float64) - targets.to(torch.float64)
    return c + beta * c * torch.exp(-(d * d) / (2.0 * sigma * sigma))


def augment_prompt(prompt: str, n: int, template: str, think_open: str = "<think>") -> str:
    """Put the budget statement inside the think block (LAPO's best position, Table 2).

    A prompt that already ends with ``<think>`` (optionally followed by whitespace) gets the statement
    right after the tag; otherwise the tag and the statement are appended.
    """
    statement = template.format(n=int(n))
    stripped = prompt.rstrip()
    if think_open and stripped.endswith(think_open):
        return stripped + statement
    return prompt + think_open + statement
