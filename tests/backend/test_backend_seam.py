"""The trainer/backend seam's batch (backend/seam.py): row slicing, trimming and the checks the backend runs
before any compute (a malformed batch must fail on every rank before a collective, never inside one)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_scpo.backend.seam import BatchError, TrainBatch


def _batch() -> TrainBatch:
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    lm = am.clone()
    lm[:, :2] = False
    return TrainBatch(input_ids=torch.arange(18).reshape(3, 6), attention_mask=am, loss_mask=lm,
                      advantages=torch.arange(18.0).reshape(3, 6), eps_low=torch.tensor([0.1, 0.2, 0.3]))


def test_rows_and_trimmed_slice_every_present_field():
    b = _batch()
    sub = b.rows([2, 0])
    assert sub.input_ids.tolist() == [list(range(12, 18)), list(range(6))]
    assert sub.eps_low.tolist() == pytest.approx([0.3, 0.1]) and sub.old_logprobs is None
    t = b.rows([0, 1]).trimmed()
    assert t.input_ids.shape == (2, 4) and t.advantages.shape == (2, 4) and t.eps_low.shape == (2,)
    assert t.seq_lens == [4, 3] and b.size == 3


def test_validate_names_the_field():
    b = _batch()
    b.validate(("advantages", "eps_low"))
    with pytest.raises(BatchError, match=r"missing fields \['old_logprobs'\]"):
        b.validate(("advantages", "old_logprobs"))
    with pytest.raises(BatchError, match="eps_low must have shape"):
        replace(b, eps_low=torch.zeros(2)).validate()
    with pytest.raises(BatchError, match="advantages must have shape"):
        replace(b, advantages=torch.zeros(3, 5)).validate()
    bad = b.advantages.clone()
    bad[0, 3] = float("inf")
    with pytest.raises(BatchError, match="advantages contains NaN/inf"):
        replace(b, advantages=bad).validate()
    lm = b.loss_mask.clone()
    lm[0, 0] = True
    with pytest.raises(BatchError, match="first token"):
        replace(b, loss_mask=lm).validate()
    lm = b.loss_mask.clone()
    lm[1, 4] = True
    with pytest.raises(BatchError, match="padding"):
        replace(b, loss_mask=lm).validate()
