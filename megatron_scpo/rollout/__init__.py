"""Rollout engines: one RolloutEngine protocol, an in-process LocalEngine (CPU) and SGLangEngine (servers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
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


def sampling_params(cfg: RolloutConfig, *, temperature: float, seed: int | None, eos_id: int) -> SamplingParams:
    """The rollout section's sampling settings at ``temperature`` with ``seed`` (validated); EOS always stops.

    ``temperature``: ``rollout.temperature`` for RL rollouts, a stage's own (stage 1 rejection sampling).
    ``seed``: the caller's (the trainer derives it from ``rl.seed`` and the step, so a resumed step samples the
    same rows). ``stop_token_ids``: ``{eos_id} | rollout.stop_token_ids``, sorted.
    """
    return SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        stop=list(cfg.stop), stop_token_ids=sorted({eos_id, *cfg.stop_token_ids}), seed=seed,
    ).validate()


def build_engine(cfg: RolloutConfig, hf_dir: str | Path, tokenizer: Any) -> RolloutEngine:
    """The engine ``cfg.engine`` selects, serving the HF model dir ``hf_dir`` (``scpo train``, ``scpo eval``).

    ``local``: a LocalEngine in this process (``LocalEngine.from_pretrained``, ``local_max_batch_size`` rows per
    decode). ``sglang``: an SGLangEngine on ``sglang_urls``, or on servers it launches from ``cfg.sglang`` with
    ``model_path`` defaulting to ``hf_dir``; prompts are checked against ``len(tokenizer)``.
    """
    if cfg.engine == "local":
        from megatron_scpo.rollout.local import LocalEngine

        return LocalEngine.from_pretrained(hf_dir, tokenizer=tokenizer, max_batch_size=cfg.local_max_batch_size)
    from megatron_scpo.rollout.sglang import SGLangEngine

    sg = cfg.sglang if cfg.sglang.model_path is not None else dataclasses.replace(cfg.sglang, model_path=str(hf_dir))
    return SGLangEngine(sg, urls=list(cfg.sglang_urls) or None, vocab_size=len(tokenizer))


__all__ = [
    "LogprobMismatchError", "RolloutConfig", "RolloutEngine", "RolloutInputError", "RolloutServerError", "SGLangConfig",
    "Sample", "SamplingParams", "WeightSyncError", "build_engine", "sampling_params",
]
