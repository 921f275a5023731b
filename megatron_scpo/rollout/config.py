"""Rollout engine section of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RolloutConfig:
    """How samples are generated: in-process (CPU default) or SGLang servers."""

    engine: Literal["local", "sglang"] = "local"
    n_samples: int = 8  # group size G
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    sglang_urls: list[str] = field(default_factory=list)  # attach to running servers
    logprob_tolerance: float = 1e-3  # post-sync check, max |engine - trainer| log-prob

    def validate(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
