"""Data section of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_scpo.configlib import check_min
from megatron_scpo.data.answers import AnswerExtraction


@dataclass
class SyntheticConfig:
    """The arithmetic-chain task (data/synthetic.py): sizes, difficulty range, value range, seed."""

    n_train: int = 2000
    n_eval: int = 200
    min_ops: int = 1
    max_ops: int = 4
    max_operand: int = 9
    max_value: int = 50  # every intermediate value stays in [0, max_value]
    eval_percent: int = 10  # share of the problem space (by hash) reserved for eval
    seed: int = 0

    def validate(self) -> None:
        if self.n_train < 0 or self.n_eval < 0:
            raise ValueError(f"n_train/n_eval must be >= 0, got {self.n_train}, {self.n_eval}")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, max_ops={self.max_ops}")
        if self.max_operand < 2 or self.max_value < 2 * self.max_operand:
            raise ValueError(f"need max_operand >= 2 and max_value >= 2 * max_operand, got {self.max_operand}, "
                             f"{self.max_value}")
        if not 1 <= self.eval_percent <= 50:
            raise ValueError(f"eval_percent must be in 1..50, got {self.eval_percent}")


@dataclass
class DataConfig:
    """Prompt source: JSONL/Parquet files, or the synthetic arithmetic-chain task."""

    source: Literal["synthetic", "file"] = "synthetic"
    train_path: str | None = None
    eval_path: str | None = None
    # File field names; None auto-detects (problem/question/prompt..., answer/solution/..., id/uid/...).
    problem_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    # Row layout of the files: our own (jsonl) or a public format read as is (data/formats.py; the field
    # names above then do not apply). CHAMP is converted once: scpo data convert --format champ OUT.
    format: Literal["jsonl", "gsm8k", "math", "aime", "deepscaler"] = "jsonl"
    template: Literal["raw_think", "chat", "synthetic"] = "raw_think"
    # How a response's final answer is found when grading (RL rewards, stage 1, eval; data/verify.py): ``boxed``
    # (the last \boxed{}; none is wrong) or ``last_number`` (the box if there is one, else the last number of the
    # response: for models that do not box; lm-eval flexible-extract, verl gsm8k "flexible"). docs/data.md.
    answer_extraction: AnswerExtraction = "boxed"
    max_prompt_tokens: int = 128
    shuffle_seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        if self.source == "file" and not self.train_path:
            raise ValueError("source: file needs train_path")
        check_min(self, 1, "max_prompt_tokens")
