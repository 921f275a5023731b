"""Data section of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Prompt source: JSONL/Parquet files, or the synthetic arithmetic-chain task."""

    source: Literal["synthetic", "file"] = "synthetic"
    train_path: str | None = None
    eval_path: str | None = None
    template: Literal["raw_think", "chat"] = "raw_think"
    max_prompt_tokens: int = 128

    def validate(self) -> None:
        if self.source == "file" and not self.train_path:
            raise ValueError("source: file needs train_path")
