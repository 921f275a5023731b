"""The losses the trainer hands the backend (Megatron's loss_func seam; ``backend/seam.py`` has the contract).

A config knob reaches the loss in three hops: YAML -> ``LossConfig`` / ``ClipConfig`` -> ``PolicyLoss`` ->
``scpo_kernels.policy_loss`` (the op that trains, tested equal to the spec ``algo/losses.py``). The backend
owns micro-batching, log-probs, the global-batch scaling (it weights each micro-batch by
``units(mb) / units(global)``), metric reduction and the optimizer step; these classes own what is optimized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scpo_kernels import agg_units, check_loss_options, policy_loss
from torch import Tensor

from megatron_scpo.algo.config import LossConfig
from megatron_scpo.algo.losses import AggMode, sft_loss, truncated_is_weights
from megatron_scpo.backend.seam import TrainBatch

#: The stats both losses report: token sums over a micro-batch, token means once the backend reduces them
#: (clip fractions of the surrogate and the k3 KL to the reference; 0 where a loss has no such term, so SFT
#: and RL steps log the same columns).
STAT_NAMES = ("clip_frac_low", "clip_frac_high", "kl")


@dataclass(frozen=True, kw_only=True)
class PolicyLoss:
    """Clipped-ratio policy loss with per-sample clip ranges (``TrainBatch.eps_low/eps_high``).

    agg / norm_length: aggregation (``LossConfig``). kl_coef > 0: k3 KL to ``ref_logprobs``. tis_cap: truncated
    importance weights ``min(exp(old - rollout), cap)`` from ``rollout_logprobs``; None: no TIS (the batch's
    rollout log-probs are not read). dual_clip: ``ClipConfig.dual_clip`` (None: off). temperature: the
    rollout temperature, so old, new and rollout log-probs score the same distribution. Raises ValueError
    naming the field when built with a value the kernel op would refuse.
    """

    agg: AggMode
    norm_length: int | None
    kl_coef: float
    tis_cap: float | None
    dual_clip: float | None
    temperature: float

    def __post_init__(self) -> None:
        check_loss_options(agg=self.agg, norm_length=self.norm_length, dual_clip=self.dual_clip, kl_coef=self.kl_coef)
        if self.agg == "seq-mean-token-sum-norm" and self.norm_length is None:
            # the kernel would fall back to each micro-batch's own width (prompt included, varying with packing
            # and trimming): not Dr.GRPO's constant normalizer. The config derives it (rollout.max_new_tokens).
            raise ValueError("agg seq-mean-token-sum-norm needs norm_length (the generation budget), got None")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap > 0):
            raise ValueError(f"tis_cap must be a finite number > 0 or None, got {self.tis_cap}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_config(cls, loss: LossConfig, dual_clip: float | None, temperature: float) -> PolicyLoss:
        """``algo.loss`` + ``algo.clip.dual_clip`` + ``rollout.temperature``."""
        return cls(agg=loss.agg, norm_length=loss.norm_length, kl_coef=loss.kl_coef, tis_cap=loss.tis_cap,
                   dual_clip=dual_clip, temperature=temperature)

    @property
    def requires(self) -> tuple[str, ...]:
        return (("advantages", "old_logprobs", "eps_low", "eps_high")
                + (("ref_logprobs",) if self.kl_coef > 0 else ()) + (("rollout_logprobs",) if self.tis_cap is not None else ()))

    @property
    def stat_names(self) -> tuple[str, ...]:
        return STAT_NAMES

    def units(self, loss_mask: Tensor) -> Tensor:
        return agg_units(loss_mask, self.agg)

    def __call__(self, mb: TrainBatch, logprobs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss of micro-batch ``mb`` aggregated over its own units, stats as token sums)."""
        mask = mb.loss_mask.bool()
        old = mb.old_logprobs.float()
        tis = None if self.tis_cap is None else truncated_is_weights(old, mb.rollout_logprobs.float(), cap=self.tis_cap)
        ref = mb.ref_logprobs.float() if self.kl_coef > 0 else None
        value, m = policy_loss(logprobs, old, mb.advantages.float(), mask, mb.eps_low.float(), mb.eps_high.float(),
                               dual_clip=self.dual_clip, tis_weights=tis, agg=self.agg, norm_length=self.norm_length,
                               ref_logprobs=ref, kl_coef=self.kl_coef)
        ntok = mask.sum().to(torch.float32)
        zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
        stats = {"clip_frac_low": m["clipfrac_low"].detach().float() * ntok,
                 "clip_frac_high": m["clipfrac_high"].detach().float() * ntok,
                 "kl": m["kl"].detach().float() * ntok if "kl" in m else zero}
        return value, stats


@dataclass(frozen=True)
class SFTLoss:
    """Response-token NLL, token-mean over the global batch (warm start, stage-1 RS+SFT): ``algo.losses.sft_loss``."""

    @property
    def temperature(self) -> float:
        return 1.0  # the model's own distribution: SFT never rescales the logits

    @property
    def requires(self) -> tuple[str, ...]:
        return ()

    @property
    def stat_names(self) -> tuple[str, ...]:
        return STAT_NAMES

    def units(self, loss_mask: Tensor) -> Tensor:
        return agg_units(loss_mask, "token-mean")

    def __call__(self, mb: TrainBatch, logprobs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
        return sft_loss(logprobs, mb.loss_mask.bool()), {n: zero for n in STAT_NAMES}
