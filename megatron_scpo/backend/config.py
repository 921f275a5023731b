"""Model and parallelism sections of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """Where the policy comes from: an HF checkpoint dir, or an HF config to build a fresh model."""

    hf_path: str | None = None  # HF model dir (config.json + safetensors + tokenizer)
    mcore_path: str | None = None  # Megatron dist-checkpoint dir (from `scpo convert hf-to-mcore`)
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class ParallelConfig:
    """Megatron parallel layout; DP is what remains of the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline chunks per PP stage (interleaved 1F1B); 1 = off
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    def validate(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.vpp < 1:
            raise ValueError(f"tp, pp and vpp must be >= 1, got tp={self.tp} pp={self.pp} vpp={self.vpp}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp={self.vpp} needs pp > 1")
