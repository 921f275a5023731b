"""Evaluation arithmetic with no model in sight: pass@k, the AE score, per-difficulty aggregation.

Kept apart from evaluate.py so the report (and its tests) need neither Megatron nor a model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from math import comb
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for n samples with c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ae_score(acc_base: float, acc: float, len_base: float, length: float) -> float | None:
    """Accuracy-efficiency score (SmartThinker-ICML, reconstructed: papers.md 3.5).

    ``dL = (len_base - len) / len_base``, ``dA = (acc - acc_base) / acc_base``;
    ``AE = dL + 3 dA`` if ``dA >= 0`` else ``dL - 5 |dA|``. None when the baseline is degenerate.
    """
    if len_base <= 0 or acc_base <= 0:
        return None
    dl = (len_base - length) / len_base
    da = (acc - acc_base) / acc_base
    return dl + 3 * da if da >= 0 else dl - 5 * abs(da)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def aggregate(samples: Sequence[dict[str, Any]], pass_k: Sequence[int]) -> dict[str, Any]:
    """Per-sample records -> summary.

    Each record: ``prompt_id``, ``correct`` (bool), ``n_tokens`` and optionally ``difficulty``,
    ``critical``/``redundant`` (tokens in such steps), ``truncated``. pass@1 is the mean accuracy over
    all samples; pass@k uses the unbiased estimator per prompt, then the mean over prompts.
    """
    if not samples:
        raise ValueError("aggregate: no samples")
    by_prompt: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_prompt[s["prompt_id"]].append(s)
    n_min = min(len(v) for v in by_prompt.values())
    out: dict[str, Any] = {
        "n_prompts": len(by_prompt),
        "n_samples": len(samples),
        "pass@1": _mean([float(s["correct"]) for s in samples]),
        "pass@k": {},
        "mean_tokens": _mean([float(s["n_tokens"]) for s in samples]),
        "mean_tokens_correct": _mean([float(s["n_tokens"]) for s in samples if s["correct"]]) or None,
        "truncated_frac": _mean([float(bool(s.get("truncated", False))) for s in samples]),
    }
    for k in pass_k:
        if k <= n_min:
            out["pass@k"][str(k)] = _mean(
                [pass_at_k(len(v), sum(bool(s["correct"]) for s in v), k) for v in by_prompt.values()])
    if all("critical" in s for s in samples):
        out["critical_tokens"] = _mean([float(s["critical"]) for s in samples])
        out["redundant_tokens"] = _mean([float(s["redundant"]) for s in samples])
    if all("difficulty" in s for s in samples):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in samples:
            groups[str(s["difficulty"])].append(s)
        out["per_difficulty"] = {
            d: {k: v for k, v in aggregate(_strip(g), pass_k).items()
                if k in ("pass@1", "mean_tokens", "critical_tokens", "redundant_tokens", "n_samples")}
            for d, g in sorted(groups.items(), key=lambda kv: int(kv[0]))
        }
    return out


def _strip(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without ``difficulty`` so the per-difficulty recursion stops."""
    return [{k: v for k, v in s.items() if k != "difficulty"} for s in group]
