"""The experiment config: one YAML file, validated into the sections each package owns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_scpo import configlib
from megatron_scpo.algo.config import AlgoConfig
from megatron_scpo.backend.config import ModelConfig, ParallelConfig
from megatron_scpo.data.config import DataConfig
from megatron_scpo.rollout.config import RolloutConfig
from megatron_scpo.trainer.config import (
    CheckpointConfig,
    CompareConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RejectionSFTConfig,
    RLConfig,
    SFTConfig,
    TinyModelConfig,
)

ConfigError = configlib.ConfigError


@dataclass
class ExperimentConfig:
    """Top level of every config under configs/."""

    name: str = "experiment"
    run_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmstart: SFTConfig = field(default_factory=SFTConfig)
    stage1: RejectionSFTConfig = field(default_factory=RejectionSFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        """Derive the lengths that must equal the generation limit (null -> rollout.max_new_tokens)."""
        limit = self.rollout.max_new_tokens
        if self.algo.loss.norm_length is None:
            self.algo.loss.norm_length = limit
        if self.algo.overlong.max_length is None:
            self.algo.overlong.max_length = limit

    def validate(self) -> None:
        """Cross-section checks: lengths tied to rollout.max_new_tokens (issue 11 item 8).

        - algo.loss.norm_length is Dr.GRPO's constant normalizer, the generation budget;
        - algo.overlong.max_length is DAPO's L_max, the generation limit (a smaller window punished complete
          responses as overlong), and the window must fit under it.
        Raises ValueError naming the keys.
        """
        limit = self.rollout.max_new_tokens
        if self.algo.loss.norm_length != limit:
            raise ValueError(
                f"algo.loss.norm_length ({self.algo.loss.norm_length}) must equal rollout.max_new_tokens ({limit}); "
                "leave it null to derive it"
            )
        ol = self.algo.overlong
        if ol.max_length != limit:
            raise ValueError(
                f"algo.overlong.max_length ({ol.max_length}) must equal rollout.max_new_tokens ({limit}); "
                "leave it null to derive it"
            )
        try:  # the window rule's one home (OverlongConfig), now that max_length is the derived limit
            ol.validate()
        except ValueError as e:
            raise ValueError(f"algo.overlong.{e}") from None


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """YAML file + ``key.path=value`` overrides -> validated ExperimentConfig."""
    return configlib.load(ExperimentConfig, path, overrides)
