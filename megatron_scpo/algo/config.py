"""Typed knobs of the algorithms (pure dataclasses: no I/O, no Megatron).

Names follow the papers (see docs/algorithms.md for the mapping). The algo helper owns this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MethodName = Literal["scpo", "lapo_stage1", "lapo_stage2", "calibration", "grpo", "global_length_penalty"]


@dataclass
class ClipConfig:
    """Clip range of the ratio; difficulty-adaptive per prompt for SCPO."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    adaptive: bool = False
    eps_low_min: float = 0.1
    eps_low_max: float = 0.3
    eps_high_min: float = 0.1
    eps_high_max: float = 0.3
    invert: bool = False
    dual_clip: float | None = None  # c > 1 enables dual-clip for negative advantages

    def validate(self) -> None:
        for name in ("eps_low", "eps_high", "eps_low_min", "eps_low_max", "eps_high_min", "eps_high_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")


@dataclass
class LossConfig:
    """Policy-loss aggregation and regularizers."""

    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0  # k3 KL to the reference policy, 0 disables the reference pass
    tis_cap: float | None = None  # truncated importance sampling cap (rollout vs trainer log-probs)
    norm_length: int = 1024  # constant normalizer of seq-mean-token-sum-norm


@dataclass
class AlgoConfig:
    """Which method, and the method's knobs."""

    method: MethodName = "scpo"
    clip: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
