"""SCPO online importance estimator (RECONSTRUCTED; the paper's definition was not available).

For a correct response with reasoning steps s_1..s_S (the answer step is never scored) the old policy
scores the gold answer a* after a forcing suffix c (e.g. ``</think> The answer is \\boxed{``):
    prefix_gain:   I_k = log p(a* | q, s_1..s_k, c) - log p(a* | q, s_1..s_(k-1), c)
    leave_one_out: I_k = log p(a* | q, s_1..s_S, c) - log p(a* | q, s_1..s_S without s_k, c)
Both need S + 1 teacher-forced sequences. ``max_scored_steps`` caps the work: adjacent steps merge into
U <= max_scored_steps units (unit of step j = floor(j * U / S)) and every step gets its unit's value.
Importances are normalized within the response to [0, 1]: min-max (all equal -> 1) or
softmax(I / temperature). The answer step gets ``answer_step_importance``.

The scorer is a callable ``scorer(sequences, answer_positions) -> list[float]``: for each token-id
sequence, the sum over ``i in answer_positions`` of ``log p(seq[i] | seq[:i])`` (the trainer passes a
batched Megatron forward). Forcing suffix and answer are tokenized separately by the caller, so the
answer positions are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_scpo.algo.config import ImportanceConfig

Scorer = Callable[[list[list[int]], list[list[int]]], Sequence[float]]


@dataclass
class ImportanceItem:
    """One correct response to score: token ids, its per-token step ids [T] and the gold answer ids."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    step_ids: Tensor
    answer_ids: Sequence[int]
    answer_step: int | None = None  # step id of the answer step (not scored), None if absent


@dataclass
class _Plan:
    num_steps: int
    scored_steps: int
    unit_of_step: list[int]
    num_units: int
    first_seq: int


@dataclass
class ImportanceRequests:
    """The flat scoring batch for all items plus the bookkeeping to turn scores into importances."""

    sequences: list[list[int]] = field(default_factory=list)
    answer_positions: list[list[int]] = field(default_factory=list)
    plans: list[_Plan] = field(default_factory=list)


def _units(scored: int, cap: int) -> tuple[list[int], int]:
    U = min(scored, cap)
    return [j * U // scored for j in range(scored)], U


def build_importance_requests(
    items: Sequence[ImportanceItem], forcing_ids: Sequence[int], cfg: ImportanceConfig | None = None
) -> ImportanceRequests:
    """Teacher-forced sequences (prompt + reasoning prefix/ablation + forcing + answer) for every item."""
    cfg = cfg or ImportanceConfig()
    req = ImportanceRequests()
    forcing = list(forcing_ids)
    for i, it in enumerate(items):
        ids = it.step_ids.reshape(-1)
        resp = list(it.response_ids)
        if ids.numel() != len(resp):
            raise ValueError(f"item {i}: step_ids has {ids.numel()} entries but response_ids has {len(resp)}")
        if len(it.answer_ids) == 0:
            raise ValueError(f"item {i}: empty answer_ids (the gold answer must have at least one token)")
        K = int(ids.max()) + 1 if ids.numel() else 0
        if K and bool((ids < 0).any()):
            raise ValueError(f"item {i}: step_ids must be >= 0 over the response")
        S = K if it.answer_step is None else min(int(it.answer_step), K)
        unit_of_step, U = _units(S, cfg.max_scored_steps) if S else ([], 0)
        plan = _Plan(K, S, unit_of_step, U, len(req.sequences))
        req.plans.append(plan)
        if S == 0:
            continue
        if bool((ids.diff() < 0).any()):
            raise ValueError(f"item {i}: step_ids must be non-decreasing (steps are contiguous token ranges)")
        # units are contiguous token ranges too: bounds[u] = first token of unit u, bounds[U] = end of reasoning
        first_step_of_unit = torch.tensor([unit_of_step.index(u) for u in range(U)] + [S], dtype=torch.long)
        bounds = torch.searchsorted(ids, first_step_of_unit).tolist()
        if cfg.mode == "prefix_gain":  # prefixes of the first k units, k = 0..U
            bodies = [resp[: bounds[k]] for k in range(U + 1)]
        else:  # all units, then each unit left out
            bodies = [resp[: bounds[U]]] + [resp[: bounds[k]] + resp[bounds[k + 1] : bounds[U]] for k in range(U)]
        prompt, tail = list(it.prompt_ids), forcing + list(it.answer_ids)
        for body in bodies:
            seq = prompt + body + tail
            req.sequences.append(seq)
            req.answer_positions.append(list(range(len(seq) - len(it.answer_ids), len(seq))))
    return req


def _normalize(raw: Tensor, cfg: ImportanceConfig) -> Tensor:
    if cfg.normalize == "softmax":
        return torch.softmax(raw / cfg.softmax_temperature(), dim=0)
    lo, hi = raw.min(), raw.max()
    if float(hi - lo) <= 1e-12:
        return torch.ones_like(raw)
    return (raw - lo) / (hi - lo)


def importance_from_scores(
    scores: Sequence[float], requests: ImportanceRequests, cfg: ImportanceConfig | None = None
) -> list[Tensor]:
    """Per item: importance per step [K] (float32, in [0, 1]); the answer step gets answer_step_importance."""
    cfg = cfg or ImportanceConfig()
    s = torch.as_tensor(list(scores), dtype=torch.float64)
    if s.numel() != len(requests.sequences):
        raise ValueError(f"scorer returned {s.numel()} scores for {len(requests.sequences)} sequences")
    out = []
    for i, p in enumerate(requests.plans):
        w = torch.full((p.num_steps,), cfg.answer_step_importance, dtype=torch.float64)
        if p.scored_steps:
            sc = s[p.first_seq : p.first_seq + p.num_units + 1]
            if not bool(torch.isfinite(sc).all()):
                raise ValueError(f"item {i}: the scorer returned a non-finite answer log-prob {sc.tolist()}")
            raw = sc[1:] - sc[:-1] if cfg.mode == "prefix_gain" else sc[0] - sc[1:]
            unit_w = _normalize(raw, cfg)
            w[: p.scored_steps] = unit_w[torch.tensor(p.unit_of_step, dtype=torch.long)]
        out.append(w.to(torch.float32))
    return out


def estimate_importance(
    items: Sequence[ImportanceItem], forcing_ids: Sequence[int], scorer: Scorer, cfg: ImportanceConfig | None = None
) -> list[Tensor]:
    """Build all requests, score them in one scorer call, return per-item step importances."""
    req = build_importance_requests(items, forcing_ids, cfg)
    scores = scorer(req.sequences, req.answer_positions) if req.sequences else []
    return importance_from_scores(scores, req, cfg)
