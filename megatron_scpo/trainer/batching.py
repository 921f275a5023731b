"""(prompt, response) token lists -> the right-padded tensors the trainer hands to the backend.

Layout: right-padded rows ``[prompt | response | pad]`` of length S (``PaddedBatch``). This is the trainer's
host-side layout only: with ``parallel.packed_sequences`` the backend removes the padding before the model
runs (``backend/packing.py``, verl's remove-padding), so the padding here costs no model compute. Per-token response quantities
(advantages, rollout log-probs, step ids) are given per response token ``[B, T]`` and land at the same
positions as the tokens themselves, matching the backend's log-prob convention
``logprobs[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from megatron_scpo.backend.packing import balanced_partition
from megatron_scpo.backend.seam import TrainBatch


@dataclass
class PaddedBatch:
    """Right-padded ``[B, S]`` rows ``[prompt | response | pad]`` and where each part lies."""

    input_ids: Tensor  # [B, S] long
    attention_mask: Tensor  # [B, S] bool: prompt + response
    loss_mask: Tensor  # [B, S] bool: response tokens only
    prompt_lens: list[int]
    response_lens: list[int]

    def scatter(self, per_token: Tensor, fill: float = 0.0) -> Tensor:
        """Response-aligned ``[B, T]`` -> sequence-aligned ``[B, S]`` (zeros/``fill`` elsewhere)."""
        b, s = self.input_ids.shape
        out = torch.full((b, s), fill, dtype=per_token.dtype)
        for i, (p, n) in enumerate(zip(self.prompt_lens, self.response_lens)):
            out[i, p:p + n] = per_token[i, :n]
        return out

    def gather(self, per_position: Tensor) -> Tensor:
        """Sequence-aligned ``[B, S]`` -> response-aligned ``[B, T]`` (T = longest response, zero padded)."""
        t = max(self.response_lens, default=0)
        out = torch.zeros(len(self.prompt_lens), t, dtype=per_position.dtype)
        for i, (p, n) in enumerate(zip(self.prompt_lens, self.response_lens)):
            out[i, :n] = per_position[i, p:p + n]
        return out

    @property
    def seq_lens(self) -> list[int]:
        """Real tokens (prompt + response) per row: what a micro-batch or a DP rank computes when packed."""
        return [p + n for p, n in zip(self.prompt_lens, self.response_lens)]

    def select(self, idx: Sequence[int]) -> PaddedBatch:
        """Rows ``idx`` (for mini-batches), trimmed to their own longest row."""
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        lens = self.seq_lens
        s = max(lens[i] for i in idx)
        return PaddedBatch(self.input_ids[ix, :s], self.attention_mask[ix, :s], self.loss_mask[ix, :s],
                           [self.prompt_lens[i] for i in idx], [self.response_lens[i] for i in idx])

    def train_batch(self, **fields: Tensor | None) -> TrainBatch:
        """These rows as the backend's ``TrainBatch``; ``fields``: its optional fields (advantages, ...), ``[B, S]``
        sequence-aligned (``scatter``) or ``[B]``."""
        return TrainBatch(input_ids=self.input_ids, attention_mask=self.attention_mask, loss_mask=self.loss_mask,
                          **fields)


def dp_share(batch: TrainBatch, rows: Sequence[int], dp: int, dp_rank: int) -> TrainBatch:
    """This data-parallel rank's part of ``rows`` of ``batch`` (one optimizer step), trimmed to its longest row.

    Every rank gets the same number of rows, balanced by real tokens (``backend.packing.balanced_partition``,
    LPT; verl balances DP ranks by sequence length too): under packing a rank computes its tokens, so token
    balance is step-time balance. Each part keeps the order of ``rows`` (at DP=1 the batch is ``rows`` as
    given). Fewer rows than ranks: the missing ones are copies of ``rows[0]`` with an empty loss mask, so every
    rank runs the same collectives and adds nothing to the loss. The backend normalizes the loss over the global
    batch, so the split changes no number beyond float summation order. Raises ValueError on no rows.
    """
    if not rows:
        raise ValueError("dp_share: no rows to split")
    n_pad = max(0, dp - len(rows))
    cand = list(rows) + [rows[0]] * n_pad
    lens = batch.seq_lens
    part = balanced_partition([lens[i] for i in cand], dp, equal_size=True)[dp_rank]
    idx = [cand[j] for j in part]
    pad = torch.tensor([j >= len(rows) for j in part], dtype=torch.bool)
    sub = batch.rows(idx).trimmed()
    return replace(sub, loss_mask=sub.loss_mask.bool() & ~pad[:, None]) if bool(pad.any()) else sub


def pad_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
              multiple_of: int = 1) -> PaddedBatch:
    """Right-pad ``prompt + response`` rows to one length (rounded up to ``multiple_of``)."""
    if len(prompts) != len(responses):
        raise ValueError(f"pad_batch: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("pad_batch: empty batch")
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    s = max(lens)
    s = -(-s // multiple_of) * multiple_of
    ids = torch.full((len(lens), s), pad_id, dtype=torch.long)
    attn = torch.zeros(len(lens), s, dtype=torch.bool)
    loss = torch.zeros(len(lens), s, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.as_tensor(list(p) + list(r), dtype=torch.long)
        attn[i, :len(p) + len(r)] = True
        loss[i, len(p):len(p) + len(r)] = True
    return PaddedBatch(ids, attn, loss, [len(p) for p in prompts], [len(r) for r in responses])


def pad_response_tensors(rows: Sequence[Sequence[float]], dtype: torch.dtype = torch.float32,
                         fill: float = 0.0) -> Tensor:
    """Ragged per-token lists -> ``[B, T]`` padded with ``fill``."""
    t = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), t), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out
