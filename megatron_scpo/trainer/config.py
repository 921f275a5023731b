"""Trainer sections of the experiment config.

One section per stage of the pipeline (warm-start SFT -> stage 1 rejection-sampling SFT -> stage 2 RL),
plus evaluation, the method comparison of the embedded default, checkpointing and logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_scpo.configlib import check_min

# Methods a comparison may run; kept in sync with algo.config.MethodName (the registry rejects others).
DEFAULT_MAX_DRAWS = 4  # rl.dynamic_sampling_max_draws when null (verl's max_num_gen_batches is unbounded by default)

CompareMethod = Literal["scpo", "lapo_stage1", "lapo_stage2", "calibration", "grpo", "global_length_penalty"]


@dataclass
class OptimConfig:
    """Adam settings of stage 2 (the SFT stages have their own lr)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def validate(self) -> None:
        check_min(self, 0, "lr", strict=True)
        check_min(self, 0, "clip_grad")


@dataclass
class RLConfig:
    """Stage 2: RL steps with the configured method."""

    enabled: bool = True
    steps: int = 150
    prompts_per_step: int = 64
    micro_batch_size: int = 8
    mini_batches: int = 1  # optimizer updates per rollout step (papers: 1024 samples / 128 = 8 for LAPO)
    seed: int = 1234
    sync_check: bool = True  # post-sync check after every weight sync (rollout.check_num_sequences sequences)
    importance_micro_batch: int = 32  # teacher-forced scoring batch for the SCPO importance estimator
    # How a response cut at max_new_tokens (finish reason ``length``) or left inside an open think block is
    # graded, in RL rollouts, stage-1 rejection sampling and evaluation alike (data/verify.py): ``wrong``
    # (default; DAPO/verl: an unfinished response earns no credit) or ``grade`` (graded on the whole text).
    truncated_grading: Literal["wrong", "grade"] = "wrong"
    # DAPO overlong filtering (Yu et al. 2025, section 3.4): truncated samples (finish reason ``length``) are
    # removed from the loss mask, so they add nothing to the policy-loss numerator, its token/sequence
    # denominator or the KL term. They still count in their group's reward statistics.
    overlong_filter: bool = False
    # DAPO dynamic sampling (section 3.2; verl ``algorithm.filter_groups`` with metric ``acc``): groups whose
    # samples are all correct or all wrong (as graded, after aborted samples are dropped) are filtered and
    # more prompts are drawn, ``prompts_per_step`` at a time, until ``prompts_per_step`` groups are kept or
    # ``dynamic_sampling_max_draws`` generation rounds were run (then the step trains on the groups it has).
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int | None = None  # generation rounds per step; null: 4 (needs dynamic_sampling)

    def validate(self) -> None:
        check_min(self, 0, "steps")
        check_min(self, 1, "prompts_per_step", "micro_batch_size", "mini_batches", "importance_micro_batch")
        if self.dynamic_sampling_max_draws is not None:
            if not self.dynamic_sampling:
                raise ValueError("dynamic_sampling_max_draws does nothing without dynamic_sampling: true")
            check_min(self, 1, "dynamic_sampling_max_draws")

    @property
    def max_draws(self) -> int:
        """Generation rounds per RL step: 1 without dynamic sampling, else the configured bound (default 4)."""
        if not self.dynamic_sampling:
            return 1
        return DEFAULT_MAX_DRAWS if self.dynamic_sampling_max_draws is None else self.dynamic_sampling_max_draws


@dataclass
class SFTConfig:
    """Warm start: SFT on verbose synthetic traces so the tiny model becomes a "long-CoT" reasoner."""

    enabled: bool = False
    steps: int = 300
    batch_size: int = 32
    micro_batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    trace: Literal["verbose", "concise"] = "verbose"
    log_every: int = 20
    checkpoint_interval: int = 200  # SFT steps between mid-phase checkpoints (0: off; a stop always writes one)

    def validate(self) -> None:
        if self.enabled:
            check_min(self, 1, "steps", "batch_size", "micro_batch_size")
        check_min(self, 0, "checkpoint_interval")
        check_min(self, 0, "lr", strict=True)


@dataclass
class RejectionSFTConfig:
    """Stage 1: sample N per problem, keep verified-correct, pick short ones, SFT on response tokens."""

    enabled: bool = False
    n_prompts: int = 128
    n_samples: int = 8
    temperature: float = 1.0
    select: Literal["shortest", "below_median"] = "shortest"
    epochs: int = 1
    batch_size: int = 32
    micro_batch_size: int = 32
    lr: float = 1e-4
    # > 0: a checkpoint right after sampling (it holds the selected pairs, so a resume never re-samples)
    # and every this many SFT steps; 0: none (a stop still writes one)
    checkpoint_interval: int = 50

    def validate(self) -> None:
        if self.enabled:
            check_min(self, 1, "n_prompts", "n_samples", "epochs", "batch_size")
        check_min(self, 0, "checkpoint_interval")
        check_min(self, 0, "temperature", strict=True)


@dataclass
class EvalConfig:
    """Evaluation after each stage (and by `scpo eval`): pass@1, pass@k, tokens, AE, per difficulty."""

    enabled: bool = True
    n_prompts: int = 128
    n_samples: int = 4  # samples per prompt; pass@k for every k in pass_k <= n_samples
    pass_k: list[int] = field(default_factory=lambda: [1, 4])
    temperature: float = 0.6
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    seed: int = 4321

    def validate(self) -> None:
        check_min(self, 1, "n_prompts", "n_samples")
        bad = [k for k in self.pass_k if k < 1 or k > self.n_samples]
        if bad:
            raise ValueError(f"pass_k values {bad} must be in [1, n_samples={self.n_samples}]")


@dataclass
class CompareConfig:
    """Several stage-2 methods in one run.

    ``independent``: every method starts from the same snapshot (the state after stage 1) and the
    report compares them side by side. ``sequential``: each method continues from the previous one's
    result and inherits its method state (LAPO: ``[lapo_stage1, lapo_stage2]`` hands the length map on).
    Empty ``methods``: a single stage 2 with ``algo.method``.
    """

    methods: list[CompareMethod] = field(default_factory=list)
    mode: Literal["independent", "sequential"] = "independent"

    def validate(self) -> None:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {self.methods}")


@dataclass
class TinyModelConfig:
    """The locally built model when ``model.hf_path`` is null (data.tiny_model.tiny_llama_config)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 512
    seed: int = 0

    def overrides(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "seed"}

    def validate(self) -> None:
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} != num_attention_heads {self.num_attention_heads} "
                             f"* head_dim {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


@dataclass
class CheckpointConfig:
    interval: int = 25  # RL steps; 0 disables periodic checkpoints (stage ends are always saved)
    keep: int = 2
    # Every checkpoint also holds an HF safetensors copy in <ckpt>/hf/ (config, tokenizer and generation config
    # are there either way), written inside the checkpoint's atomic save (trainer/checkpoint.py).
    save_hf: bool = False

    def validate(self) -> None:
        check_min(self, 0, "interval")
        check_min(self, 1, "keep")


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    stdout: bool = True
    progress: bool = True  # tqdm bars for long loops
