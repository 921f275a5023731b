"""Trainer sections of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 1.0


@dataclass
class RLConfig:
    """Stage 2: RL steps with the configured method."""

    steps: int = 150
    prompts_per_step: int = 64
    micro_batch_size: int = 8
    seed: int = 1234


@dataclass
class CheckpointConfig:
    interval: int = 25  # steps; 0 disables
    keep: int = 2


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
