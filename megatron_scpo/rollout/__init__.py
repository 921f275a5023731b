"""Rollout engines: one RolloutEngine protocol, an in-process LocalEngine (CPU) and SGLangEngine (servers)."""

from __future__ import annotations

from typing import Any

from megatron_scpo.rollout.base import (
    LogprobMismatchError,
    RolloutEngine,
    RolloutInputError,
    RolloutServerError,
    Sample,
    SamplingParams,
    WeightSyncError,
)
from megatron_scpo.rollout.config import RolloutConfig, SGLangConfig


def sampling_params_from_config(cfg: RolloutConfig, **overrides: Any) -> SamplingParams:
    """The config's sampling settings as SamplingParams (validated); overrides e.g. for evaluation."""
    kw: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        stop=list(cfg.stop), stop_token_ids=list(cfg.stop_token_ids), seed=cfg.seed,
    )
    kw.update(overrides)
    return SamplingParams(**kw).validate()


def build_engine(cfg: RolloutConfig, *, model: Any = None, tokenizer: Any = None) -> RolloutEngine:
    """LocalEngine around ``model`` (a transformers causal LM) or SGLangEngine from ``cfg.sglang``."""
    if cfg.engine == "local":
        if model is None:
            raise ValueError("rollout.engine=local needs the transformers model to sample from")
        from megatron_scpo.rollout.local import LocalEngine

        return LocalEngine(model, tokenizer, max_batch_size=cfg.local_max_batch_size)
    from megatron_scpo.rollout.sglang import SGLangEngine

    return SGLangEngine(cfg.sglang, cfg.sglang_urls or None)


__all__ = [
    "LogprobMismatchError", "RolloutConfig", "RolloutEngine", "RolloutInputError", "RolloutServerError", "SGLangConfig",
    "Sample", "SamplingParams", "WeightSyncError", "build_engine", "sampling_params_from_config",
]
