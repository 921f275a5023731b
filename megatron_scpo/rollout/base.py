"""The rollout engine contract shared by LocalEngine (in-process) and SGLangEngine (HTTP servers).

Everything the trainer needs from an engine is here: sampling parameters (validated before any work),
the per-sample record (token ids, text, per-token log-probs, finish reason, weight version) and the
``RolloutEngine`` protocol. Log-prob semantics are fixed here once so both engines agree with the
trainer's recomputation: ``logprobs[i] = log_softmax(logits_i / T)[token_i]``, i.e. under the sampling
temperature but *before* top-k/top-p truncation (the kept mass is not renormalized into the value).
Greedy decoding reports log-probs under T = 1 (SGLang maps temperature ~0 to top_k=1 with T=1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

FinishReason = Literal["stop", "length", "abort"]

# Below this temperature sampling is argmax (same threshold as SGLang's sampling eps).
GREEDY_EPS = 1e-6


class RolloutInputError(ValueError):
    """Bad prompts or sampling parameters, raised before anything is generated or sent."""


class RolloutServerError(RuntimeError):
    """A rollout server failed (after the retry budget); the message names the URL."""


class WeightSyncError(RuntimeError):
    """Weights could not be synced, or the engine reports an unexpected weight version afterwards."""


class LogprobMismatchError(RuntimeError):
    """Engine and trainer disagree on teacher-forced log-probs beyond the configured tolerance."""


@dataclass
class SamplingParams:
    """How to sample; ``validate`` raises RolloutInputError naming the field."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = no top-k
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    greedy: bool = False  # argmax regardless of temperature

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < GREEDY_EPS

    @property
    def logprob_temperature(self) -> float:
        """The temperature the reported log-probs are computed under."""
        return 1.0 if self.is_greedy else float(self.temperature)

    def validate(self) -> SamplingParams:
        def bad(name: str, msg: str) -> RolloutInputError:
            return RolloutInputError(f"SamplingParams.{name}: {msg}, got {getattr(self, name)!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise bad("top_k", "must be -1 (disabled) or an int >= 1")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise bad("stop_token_ids", "must be a list of non-negative ints")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", "must be null or an int >= 0")
        if not isinstance(self.greedy, bool):
            raise bad("greedy", "must be true/false")
        return self


@dataclass
class Sample:
    """One generated response. ``token_ids`` include the stop token when one ended the sample."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]  # one per token in token_ids, see module docstring for the exact semantics
    finish_reason: FinishReason
    weight_version: int | None = None  # version of the weights that generated it (None: unknown)
    matched_stop: int | str | None = None  # stop token id or stop string, when finish_reason == "stop"

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Sample: {len(self.token_ids)} token ids but {len(self.logprobs)} log-probs")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer calls. ``generate`` returns ``out[prompt][sample]`` (n samples per prompt)."""

    weight_version: int

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]: ...

    def score(self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log-probs of ``sequences[i][prompt_lens[i]:]`` under ``temperature``."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...


def validate_prompts(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, max_context_len: int | None, vocab_size: int | None
) -> None:
    """Reject bad prompt batches before any work: empty, non-int/out-of-vocab ids, or too long to fit."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise RolloutInputError("prompts: need a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise RolloutInputError(f"prompts[{i}]: need a non-empty list of token ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise RolloutInputError(f"prompts[{i}]: token ids must be ints")
        lo, hi = min(p), max(p)
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise RolloutInputError(f"prompts[{i}]: token id out of range [0, {vocab_size}): min {lo}, max {hi}")
        if max_context_len is not None and len(p) + max_new_tokens > max_context_len:
            raise RolloutInputError(
                f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens {max_new_tokens} exceed the context "
                f"length {max_context_len}"
            )


def validate_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RolloutInputError(f"n: need an int >= 1 samples per prompt, got {n!r}")


def validate_score_inputs(
    sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], temperature: float, max_context_len: int | None,
    vocab_size: int | None,
) -> None:
    """Same checks for teacher-forced scoring; each sequence needs at least one token after its prompt."""
    if len(sequences) != len(prompt_lens):
        raise RolloutInputError(f"score: {len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
    validate_prompts(sequences, 0, max_context_len, vocab_size)
    for i, (s, pl) in enumerate(zip(sequences, prompt_lens)):
        if not isinstance(pl, int) or not 1 <= pl < len(s):
            raise RolloutInputError(f"prompt_lens[{i}]: need 1 <= prompt_len < {len(s)} (sequence length), got {pl!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise RolloutInputError(f"score: temperature must be > 0, got {temperature!r}")
