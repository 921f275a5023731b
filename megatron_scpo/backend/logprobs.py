"""Per-token log-probs from vocab-parallel logits.

Log-probs use ``scpo_kernels.fused_logprobs`` (vocab-parallel over the TP group); padded vocab rows (vocab
padded to 128*TP) get a very negative logit, never probability mass. The losses, their aggregation and its
units live in ``scpo_kernels`` (``policy_loss``, ``aggregate``, ``agg_units``); the trainer's loss functions
(``trainer/loss.py``) call them.
"""

from __future__ import annotations

from typing import Any

import torch
from scpo_kernels import fused_logprobs

__all__ = ["mask_padded_vocab", "token_logprobs"]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Give this shard's padded vocab columns (global id >= vocab_size) a finite, very negative logit.

    Finite (not -inf) so a shard made only of padding still has a well-defined local max/logsumexp.
    """
    v_local = logits.shape[-1]
    start = tp_rank * v_local
    n_real = max(0, min(v_local, vocab_size - start))
    if n_real == v_local:
        return logits
    out = logits.clone()
    out[..., n_real:] = torch.finfo(logits.dtype).min / 2
    return out


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: Any = None,
    tp_rank: int = 0,
) -> torch.Tensor:
    """out[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) under logits/temperature; out[:, 0] = 0.

    ``logits`` is this TP rank's vocab shard [B, S, V/TP]; the result is fp32 [B, S] on every TP rank.
    """
    b, s, v_local = logits.shape
    if s < 2:
        return torch.zeros(b, s, dtype=torch.float32, device=logits.device)
    shard = mask_padded_vocab(logits[:, :-1], vocab_size, tp_rank)
    targets = input_ids[:, 1:].reshape(-1)
    lp, _ = fused_logprobs(shard.reshape(-1, v_local), targets, temperature=temperature, tp_group=tp_group)
    lp = lp.reshape(b, s - 1).float()
    return torch.cat([torch.zeros(b, 1, dtype=lp.dtype, device=lp.device), lp], dim=1)

