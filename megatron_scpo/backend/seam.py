"""What the trainer gives ``MegatronPolicy.train_step``: a typed batch and a loss function (Megatron's
forward_step / loss_func seam).

The trainer owns *what* is optimized (``megatron_scpo/trainer/loss.py`` builds ``PolicyLoss`` / ``SFTLoss`` from
the config); the backend owns *how*: micro-batching and packing, log-probs from the vocab-parallel logits, the
global-batch loss scaling over micro-batches and DP ranks, NaN logits, metric reduction and the optimizer step.
The backend never imports the trainer: ``LossFn`` is the structural type it calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from torch import Tensor


class BatchError(ValueError):
    """A train/log-prob batch with missing fields, wrong shapes, NaN/inf or unsupported padding."""


#: TrainBatch fields with one value per token [B, S] / per row [B]
PER_TOKEN = ("input_ids", "attention_mask", "loss_mask", "advantages", "old_logprobs", "ref_logprobs",
             "rollout_logprobs")


@dataclass(frozen=True)
class TrainBatch:
    """This DP rank's rows of one optimizer step, right-padded ``[B, S]`` (each row ``1...1 0...0``).

    ``logprobs[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``, so per-token fields sit at the positions of
    the tokens they score. Required by every loss: input_ids (long), attention_mask (0/1), loss_mask (bool;
    0 at t=0 and on padding). The policy loss also reads advantages, old_logprobs [B, S] fp32 (trainer
    log-probs before the update, nats), eps_low/eps_high [B] (per-sample clip range); ref_logprobs [B, S] with
    a KL term, rollout_logprobs [B, S] (the engine's log-probs) with truncated importance sampling. A loss
    names what it reads in ``LossFn.requires``; fields it does not name are not read.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    advantages: Tensor | None = None
    old_logprobs: Tensor | None = None
    eps_low: Tensor | None = None
    eps_high: Tensor | None = None
    ref_logprobs: Tensor | None = None
    rollout_logprobs: Tensor | None = None

    def _map(self, fn: Callable[[str, Tensor], Tensor]) -> TrainBatch:
        return replace(self, **{f.name: fn(f.name, v) for f in fields(self) if (v := getattr(self, f.name)) is not None})

    def rows(self, idx: Tensor | list[int]) -> TrainBatch:
        """Rows ``idx`` of every field (micro-batches, DP shares); the sequence length is kept."""
        ix = torch.as_tensor(idx, dtype=torch.long)
        return self._map(lambda _, v: v[ix])

    def trimmed(self) -> TrainBatch:
        """Cut the ``[B, S]`` fields to the longest row (``attention_mask``); a row subset then pads no further."""
        s = max(self.seq_lens, default=0)
        return self._map(lambda n, v: v[:, :s] if n in PER_TOKEN else v)

    def to(self, device: torch.device | str) -> TrainBatch:
        return self._map(lambda _, v: v.to(device))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_lens(self) -> list[int]:
        """Real tokens per row (what a DP rank or a packed micro-batch computes)."""
        return self.attention_mask.to(torch.int64).sum(-1).tolist()

    def validate(self, requires: tuple[str, ...] = ()) -> None:
        """Shapes, loss-mask rules and finiteness; ``requires``: fields that must be present. Raises BatchError.

        The model-dependent checks (vocab range, sequence length, padding side) are the backend's.
        """
        missing = [n for n in requires if getattr(self, n) is None]
        if missing:
            given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
            raise BatchError(f"train batch is missing fields {missing} that the loss reads; got {given}")
        if self.input_ids.dim() != 2:
            raise BatchError(f"input_ids must be [B, S], got {tuple(self.input_ids.shape)}")
        b, s = self.input_ids.shape
        for f in fields(self):
            v = getattr(self, f.name)
            want = (b, s) if f.name in PER_TOKEN else (b,)
            if v is not None and tuple(v.shape) != want:
                raise BatchError(f"TrainBatch.{f.name} must have shape {want}, got {tuple(v.shape)}")
            if v is not None and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise BatchError(f"TrainBatch.{f.name} contains NaN/inf")
        if bool(self.loss_mask[:, 0].any()):
            raise BatchError("loss_mask[:, 0] must be 0: the first token has no log-prob")
        if bool((self.loss_mask.bool() & ~self.attention_mask.bool()).any()):
            raise BatchError("loss_mask marks padding tokens (attention_mask == 0)")


class LossFn(Protocol):
    """The loss the backend runs on each micro-batch (the trainer's ``PolicyLoss`` / ``SFTLoss``).

    ``requires``: TrainBatch fields read beyond input_ids/attention_mask/loss_mask (checked before any
    compute). ``temperature``: the logits are divided by it before the log-probs. ``units(loss_mask)``: how many
    units the loss averages over (float64 scalar: tokens, or non-empty rows); the backend sums them over
    micro-batches and DP ranks and weights each micro-batch by units_mb / units_global, so the step's loss is
    the aggregate over the whole global batch. ``__call__(mb, logprobs)``: ``logprobs`` fp32 [n, S] (0 at t=0
    and on padding) of micro-batch ``mb`` -> (scalar loss of the micro-batch, stats). ``stat_names``: the stats'
    keys; each stat is a token *sum* over the micro-batch (0-dim), and the backend reports
    sum over micro-batches and DP ranks / the global loss-token count, i.e. a token mean.
    """

    @property
    def requires(self) -> tuple[str, ...]: ...

    @property
    def temperature(self) -> float: ...

    @property
    def stat_names(self) -> tuple[str, ...]: ...

    def units(self, loss_mask: Tensor) -> Tensor: ...

    def __call__(self, mb: TrainBatch, logprobs: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...
