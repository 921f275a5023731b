"""Post-sync check shared by all engines: does the engine score tokens like the trainer does?

After a weight sync, a few fixed sequences are scored teacher-forced by the engine and by a trainer-side
scorer (the Megatron model, or any callable with the same signature). A wrong tensor name, a dropped
bucket, a stale cache or a RoPE/precision mismatch shows up here as a large ``rollout_logprob_abs_diff``
before it can poison a training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megatron_scpo.rollout.base import LogprobMismatchError, RolloutEngine

Scorer = Callable[[list[list[int]], list[int], float], list[list[float]]]


def make_check_sequences(
    vocab_size: int, num: int = 4, seq_len: int = 32, seed: int = 1234, prompt_frac: float = 0.5,
    avoid_ids: tuple[int, ...] = (),
) -> tuple[list[list[int]], list[int]]:
    """Fixed pseudo-random token sequences (same for every sync) and their prompt lengths."""
    if vocab_size <= len(avoid_ids) or num < 1 or seq_len < 2:
        raise ValueError(f"make_check_sequences: bad arguments vocab={vocab_size} num={num} seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in set(avoid_ids)])
    seqs = [allowed[torch.randint(len(allowed), (seq_len,), generator=g)].tolist() for _ in range(num)]
    pl = max(1, min(seq_len - 1, int(seq_len * prompt_frac)))
    return seqs, [pl] * num


def check_logprobs(
    engine: RolloutEngine, scorer: Scorer, sequences: list[list[int]], prompt_lens: list[int],
    tolerance: float, temperature: float = 1.0,
) -> dict[str, float]:
    """Score with both sides; return rollout_logprob_abs_diff_{max,mean}; raise above ``tolerance``."""
    got = engine.score(sequences, prompt_lens, temperature)
    ref = scorer(sequences, prompt_lens, temperature)
    diffs: list[float] = []
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        if len(a) != len(b):
            raise LogprobMismatchError(f"post-sync check: sequence {i}: engine gave {len(a)} log-probs, trainer {len(b)}")
        for x, y in zip(a, b):
            d = abs(x - y)
            if not math.isfinite(d):
                raise LogprobMismatchError(f"post-sync check: sequence {i}: non-finite log-prob (engine {x}, trainer {y})")
            diffs.append(d)
    if not diffs:
        raise LogprobMismatchError("post-sync check: nothing was scored")
    metrics = {"rollout_logprob_abs_diff_max": max(diffs), "rollout_logprob_abs_diff_mean": sum(diffs) / len(diffs)}
    if metrics["rollout_logprob_abs_diff_max"] > tolerance:
        raise LogprobMismatchError(
            f"post-sync check: max |engine - trainer| log-prob {metrics['rollout_logprob_abs_diff_max']:.3g} > tolerance "
            f"{tolerance:g} (mean {metrics['rollout_logprob_abs_diff_mean']:.3g}, weight version "
            f"{getattr(engine, 'weight_version', '?')}): the engine is not running the trainer's weights"
        )
    return metrics
