"""Step segmentation: response text + per-token character offsets -> per-token step ids (SCPO, reconstructed).

The reasoning part (inside ``<think>`` when present, before the answer) is split at a delimiter regex
(default blank line; the delimiter stays with the step it ends). The answer part (from ``</think>``
on, or without a think block from the start of the line holding the last ``\\boxed{``) forms the last
step. Steps with fewer than ``min_step_tokens`` tokens merge into the previous step (the first one into
the next); the answer step never merges. Tokens are assigned by the character their span starts at;
empty spans (special tokens such as EOS often map to (0, 0)) inherit the previous token's step.
Works with any HF fast tokenizer's ``offset_mapping``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_scpo.algo.config import SegmentationConfig


@dataclass
class Segmentation:
    """One response's steps: ``step_ids[T]`` (0..K-1, contiguous), K, and the answer step (None if absent)."""

    step_ids: Tensor
    num_steps: int
    answer_step: int | None


def _char_boundaries(text: str, cfg: SegmentationConfig) -> tuple[list[int], int | None]:
    """Character positions where a new step starts (excluding 0) and where the answer starts (or None)."""
    close = text.find(cfg.think_close) if cfg.think_close else -1
    if close >= 0:
        answer_start: int | None = close
    else:
        answer_start = None
        if cfg.answer_marker:
            last = text.rfind(cfg.answer_marker)
            if last >= 0:
                answer_start = text.rfind("\n", 0, last) + 1  # start of that line (0 if on the first line)
    reason_end = answer_start if answer_start is not None else len(text)
    reason_start = 0
    if cfg.think_open:
        op = text.find(cfg.think_open, 0, reason_end)
        if op >= 0:
            reason_start = op + len(cfg.think_open)  # the tag itself belongs to step 0
    bounds = [m.end() for m in re.finditer(cfg.delimiter, text[reason_start:reason_end])]
    bounds = sorted({reason_start + b for b in bounds if 0 < reason_start + b < reason_end})
    if answer_start is not None and 0 < answer_start < len(text):
        bounds.append(answer_start)
    if answer_start is not None and answer_start >= len(text):
        answer_start = None
    return bounds, answer_start


def _check_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for i, se in enumerate(offsets):
        s, e = int(se[0]), int(se[1])
        if not 0 <= s <= e <= len(text):
            raise ValueError(f"token {i}: offset ({s}, {e}) is not a valid span of a text of {len(text)} characters")
        out.append((s, e))
    return out


def segment_steps(
    text: str, offsets: Sequence[tuple[int, int]], cfg: SegmentationConfig | None = None
) -> Segmentation:
    """Per-token step ids of one response (see module docstring); T = len(offsets), T = 0 gives K = 0."""
    cfg = cfg or SegmentationConfig()
    offs = _check_offsets(text, offsets)
    T = len(offs)
    if T == 0:
        return Segmentation(torch.zeros(0, dtype=torch.long), 0, None)
    bounds, answer_start = _char_boundaries(text, cfg)
    raw = []  # raw step index per token (index into the char intervals)
    for t, (s, e) in enumerate(offs):
        if s == e and t > 0:
            raw.append(raw[-1])
        else:
            raw.append(bisect.bisect_right(bounds, s))
    n_int = len(bounds) + 1
    answer_raw = bisect.bisect_right(bounds, answer_start) if answer_start is not None else None
    counts = [0] * n_int
    for k in raw:
        counts[k] += 1
    # Drop empty intervals, then merge short reasoning steps into their predecessor.
    groups: list[list[int]] = []  # each group: raw interval ids forming one step
    sizes: list[int] = []
    ans_group: int | None = None
    for k in range(n_int):
        if counts[k] == 0:
            continue
        is_answer = answer_raw is not None and k == answer_raw
        if is_answer:
            ans_group = len(groups)
            groups.append([k])
            sizes.append(counts[k])
        elif groups and ans_group is None and (counts[k] < cfg.min_step_tokens or sizes[-1] < cfg.min_step_tokens):
            groups[-1].append(k)  # short step joins the previous one (or a short first step absorbs the next)
            sizes[-1] += counts[k]
        else:
            groups.append([k])
            sizes.append(counts[k])
    remap = {k: gi for gi, ks in enumerate(groups) for k in ks}
    ids = torch.tensor([remap[k] for k in raw], dtype=torch.long)
    return Segmentation(ids, len(groups), ans_group)


def stack_step_ids(per_sample: Sequence[Tensor], length: int, offsets: Sequence[int] | None = None) -> Tensor:
    """Place per-response step ids into a [B, length] tensor (-1 elsewhere); ``offsets[b]`` = first response column."""
    out = torch.full((len(per_sample), length), -1, dtype=torch.long)
    for b, ids in enumerate(per_sample):
        o = 0 if offsets is None else int(offsets[b])
        if o < 0 or o + ids.numel() > length:
            raise ValueError(f"sample {b}: {ids.numel()} step ids at offset {o} do not fit in length {length}")
        out[b, o : o + ids.numel()] = ids
    return out


def step_lengths(step_ids: Tensor) -> Tensor:
    """Tokens per step of one response's ``step_ids[T]`` (ids < 0 ignored) -> LongTensor[K]."""
    ids = step_ids[step_ids >= 0]
    if ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.bincount(ids, minlength=int(ids.max()) + 1)


def step_lengths_batch(step_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``step_ids[B, T]`` -> (lengths [B, K] with K the max step count, num_steps [B]).

    Step ids of a row must be 0..K_b-1 with every step non-empty; a gap (an empty step) raises.
    """
    if step_ids.dim() != 2:
        raise ValueError(f"step_ids must be [B, T], got shape {tuple(step_ids.shape)}")
    B = step_ids.shape[0]
    valid = step_ids >= 0
    K = int(step_ids.max()) + 1 if bool(valid.any()) else 0
    lengths = torch.zeros(B, K, dtype=torch.long)
    if K:
        b, t = valid.nonzero(as_tuple=True)
        lengths.index_put_((b, step_ids[b, t]), torch.ones_like(b), accumulate=True)
    num = torch.where(valid, step_ids + 1, torch.zeros_like(step_ids)).amax(dim=1) if step_ids.shape[1] else torch.zeros(
        B, dtype=torch.long
    )
    present = (lengths > 0).sum(dim=1)
    bad = (present != num).nonzero()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(f"sample {b}: step ids must be contiguous 0..K-1 with no empty (zero-length) step")
    return lengths, num
