"""The trainer's one entry point: ``build_method(cfg)`` -> a Method (reward + advantage + clip policy).

The trainer fills a ``GroupedRollouts`` (B samples, G per prompt, flattened; any group order), calls
``method.compute(rollouts)`` and feeds ``MethodOutput.advantages / eps_low / eps_high`` to
``losses.policy_loss``. LAPO's length map lives in the method and travels with ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from megatron_scpo.algo.clipping import adaptive_clip
from megatron_scpo.algo.config import AlgoConfig
from megatron_scpo.algo.groups import check_finite, group_index, group_normalize, masked_group_stats
from megatron_scpo.algo.rewards.baselines import (
    accuracy_reward,
    arora_zanette_reward,
    kimi_length_reward,
    overlong_penalty,
)


@dataclass
class GroupedRollouts:
    """One RL batch after verification and segmentation (pure tensors + lists).

    group_ids [B] long: samples with the same id answer the same prompt.
    correct [B] bool; response_lengths [B] long (tokens, the length every length reward uses);
    step_ids [B, T] long (-1 outside the response; 0..K_b-1 inside, contiguous);
    response_mask [B, T] bool (tokens that get an advantage); truncated [B] bool;
    prompt_keys: one stable key per sample (LAPO's map key); step_importance: per sample a float
    tensor [K_b] in [0, 1] (SCPO, correct samples) or None; values [B, T]: critic values (SCPO critic mode).
    """

    group_ids: Tensor
    correct: Tensor
    response_lengths: Tensor
    step_ids: Tensor
    response_mask: Tensor
    truncated: Tensor
    prompt_keys: list[str]
    step_importance: list[Tensor | None] | None = None
    values: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.group_ids.shape[0])

    def validate(self) -> None:
        """Raise ValueError naming the field when shapes or values are inconsistent."""
        B = self.group_ids.numel()
        if B == 0 or self.group_ids.dim() != 1:
            raise ValueError(f"group_ids must be a non-empty [B] tensor, got shape {tuple(self.group_ids.shape)}")
        for name in ("correct", "response_lengths", "truncated"):
            t = getattr(self, name)
            if t.shape != (B,):
                raise ValueError(f"{name} must be [B] = [{B}], got {tuple(t.shape)}")
        if bool((self.response_lengths < 0).any()):
            raise ValueError("response_lengths must be >= 0")
        if self.step_ids.dim() != 2 or self.step_ids.shape[0] != B:
            raise ValueError(f"step_ids must be [B={B}, T], got {tuple(self.step_ids.shape)}")
        if self.response_mask.shape != self.step_ids.shape:
            raise ValueError(
                f"response_mask {tuple(self.response_mask.shape)} must match step_ids {tuple(self.step_ids.shape)}"
            )
        if len(self.prompt_keys) != B:
            raise ValueError(f"prompt_keys must have B = {B} entries, got {len(self.prompt_keys)}")
        if self.step_importance is not None and len(self.step_importance) != B:
            raise ValueError(f"step_importance must have B = {B} entries, got {len(self.step_importance)}")
        if self.values is not None and self.values.shape != self.step_ids.shape:
            raise ValueError(f"values must be [B, T] = {tuple(self.step_ids.shape)}, got {tuple(self.values.shape)}")


@dataclass
class MethodOutput:
    """What the loss needs: token advantages [B, T] (0 outside the mask), per-sample clip ranges, metrics."""

    advantages: Tensor
    rewards: Tensor  # [B] sequence-level reward (SCPO: mean step reward)
    eps_low: Tensor
    eps_high: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    step_rewards: Tensor | None = None  # [B, K] for step-level methods
    step_advantages: Tensor | None = None


@runtime_checkable
class Method(Protocol):
    name: str
    needs_importance: bool

    def prepare_prompt(self, prompt: str, key: str) -> str: ...

    def compute(self, r: GroupedRollouts) -> MethodOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


def _batch_metrics(r: GroupedRollouts) -> dict[str, float]:
    inv, n = group_index(r.group_ids)
    acc, _, _ = masked_group_stats(r.correct.to(torch.float64), inv, n)
    L = r.response_lengths.to(torch.float64)
    c = r.correct.bool()
    return {
        "acc/mean": float(r.correct.to(torch.float64).mean()),
        "length/mean": float(L.mean()),
        "length/correct_mean": float(L[c].mean()) if bool(c.any()) else 0.0,
        "truncated/frac": float(r.truncated.to(torch.float64).mean()),
        "groups/count": float(n),
        "groups/all_correct_frac": float((acc == 1.0).to(torch.float64).mean()),
        "groups/all_wrong_frac": float((acc == 0.0).to(torch.float64).mean()),
    }


class MethodBase:
    """Shared plumbing: validation, clip policy, NaN guard, common metrics; subclasses define ``_advantages``."""

    name = "base"
    needs_importance = False

    def __init__(self, cfg: AlgoConfig) -> None:
        self.cfg = cfg

    def prepare_prompt(self, prompt: str, key: str) -> str:
        return prompt

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        return None

    def _advantages(self, r: GroupedRollouts) -> tuple[Tensor, Tensor, dict[str, float], dict[str, Tensor]]:
        """-> (token advantages [B, T], sequence rewards [B], metrics, extra MethodOutput fields)."""
        raise NotImplementedError

    def compute(self, r: GroupedRollouts) -> MethodOutput:
        r.validate()
        adv, rewards, metrics, extra = self._advantages(r)
        check_finite(f"{self.name}: rewards", rewards)
        check_finite(f"{self.name}: advantages", adv)
        adv = torch.where(r.response_mask.bool(), adv.to(torch.float32), torch.zeros((), dtype=torch.float32))
        eps_low, eps_high = adaptive_clip(r.correct, r.group_ids, self.cfg.clip)
        m = r.response_mask.bool()
        out_metrics = _batch_metrics(r)
        rw = rewards.to(torch.float64)
        out_metrics.update(
            {
                "reward/mean": float(rw.mean()),
                "reward/std": float(rw.std(unbiased=False)),
                "adv/mean": float(adv[m].mean()) if bool(m.any()) else 0.0,
                "adv/abs_mean": float(adv[m].abs().mean()) if bool(m.any()) else 0.0,
                "clip/eps_low_mean": float(eps_low.mean()),
                "clip/eps_high_mean": float(eps_high.mean()),
            }
        )
        out_metrics.update(metrics)
        return MethodOutput(adv, rewards.to(torch.float32), eps_low, eps_high, out_metrics, **extra)


class SequenceRewardMethod(MethodBase):
    """A scalar reward per response, optional DAPO overlong shaping, then GRPO group normalization."""

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def _advantages(self, r: GroupedRollouts) -> tuple[Tensor, Tensor, dict[str, float], dict[str, Tensor]]:
        rewards, metrics = self._rewards(r)
        ol = self.cfg.overlong
        if ol.enabled:
            pen = overlong_penalty(r.response_lengths, ol.max_length, ol.cache_length, ol.penalty_factor)
            metrics["overlong/penalty_mean"] = float(pen.mean())
            rewards = rewards + pen
        check_finite(f"{self.name}: rewards", rewards)
        a = self.cfg.advantage
        seq_adv = group_normalize(rewards, r.group_ids, scale_std=a.scale_std, unbiased=a.unbiased_std, eps=a.eps)
        return seq_adv[:, None].expand_as(r.step_ids).to(torch.float64), rewards, metrics, {}


class GrpoMethod(SequenceRewardMethod):
    """Accuracy-only GRPO (Dr.GRPO with advantage.scale_std=false); DAPO overlong shaping optional."""

    name = "grpo"

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        return accuracy_reward(r.correct), {}


class GlobalLengthPenaltyMethod(SequenceRewardMethod):
    """Global (response-level) length penalty baseline: Arora-Zanette sigmoid or Kimi k1.5."""

    name = "global_length_penalty"

    def _rewards(self, r: GroupedRollouts) -> tuple[Tensor, dict[str, float]]:
        lp = self.cfg.length_penalty
        if lp.style == "arora_zanette":
            return arora_zanette_reward(r.correct, r.response_lengths, r.group_ids, lp.alpha), {}
        return kimi_length_reward(r.correct, r.response_lengths, r.group_ids, lp.kimi_weight), {}


METHODS: dict[str, Callable[[AlgoConfig], Method]] = {
    "grpo": GrpoMethod,
    "global_length_penalty": GlobalLengthPenaltyMethod,
}


def build_method(cfg: AlgoConfig) -> Method:
    """Config -> method object (one per run; keep it: LAPO carries state across steps)."""
    try:
        factory = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"algo.method {cfg.method!r} is not implemented; choose one of {sorted(METHODS)}") from None
    return factory(cfg)
