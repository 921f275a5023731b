"""The one grading rule: (response text, gold, finish reason, think markers) -> correct.

Every place that grades a response (RL rollouts, stage-1 rejection sampling, evaluation) calls
``grade`` (or ``Grading.grade``, which reads the experiment config), so a response is judged the same way
everywhere. The answer comparison itself is ``data.answers.is_correct`` (last ``\\boxed{}`` after
``</think>``, integers fast, math-verify otherwise; ``data.answer_extraction: last_number`` reads the last
number of an unboxed answer); this module decides *whether a response is finished enough to be graded at all*:

- ``abort`` (the engine gave up on the request) is never correct: it is not an answer. The RL step drops
  aborted samples before rewards (trainer/rollouts.py); evaluation counts them wrong.
- ``length`` (cut at ``max_new_tokens``) and a think block left open (the prompt or the response opened
  ``<think>`` and the response never closes it) are **wrong** by default (``truncated="wrong"``): a ramble
  cut inside its reasoning may contain a boxed guess, but it never concluded. This is the convention of
  DAPO (overlong samples get no credit; Yu et al. 2025, "DAPO", section 3.4) and of verl's math rewards,
  which score a truncated response like any unfinished one. ``truncated="grade"`` restores grading on the
  whole text (the old behaviour; useful for prompts whose template never opens a think block but whose
  model emits one, or for comparing against tools that grade truncated text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megatron_scpo.data.answers import AnswerExtraction, check_extraction

TruncatedGrading = Literal["wrong", "grade"]
TRUNCATED_GRADING: tuple[str, ...] = ("wrong", "grade")


def think_open_at_end(text: str, think_open: str, think_close: str) -> bool:
    """Whether ``text`` ends inside a think block: its last ``think_open`` comes after its last ``think_close``.

    Used on a rendered prompt: the ``raw_think``/``synthetic`` templates and R1-style chat templates end with
    ``<think>`` (open), a chat template that pre-fills ``<think>\\n\\n</think>`` does not. Empty markers
    never open a block.
    """
    if not think_open:
        return False
    o = text.rfind(think_open)
    return o >= 0 and (not think_close or text.rfind(think_close) < o)


def think_closed(response: str, prompt_opens_think: bool, think_open: str = "<think>",
                 think_close: str = "</think>") -> bool:
    """False when ``response`` leaves a think block open (opened by the prompt or by itself), else True.

    A response that opens ``think_open`` itself needs a ``think_close`` after its last opening; one whose
    prompt ended inside a think block needs a ``think_close`` anywhere. Without markers (``think_close``
    empty) every response counts as closed.
    """
    if not think_close:
        return True
    o = response.rfind(think_open) if think_open else -1
    c = response.rfind(think_close)
    if o >= 0:
        return c > o
    return c >= 0 if prompt_opens_think else True


def finished(response: str, finish_reason: str, *, prompt: str = "", think_open: str = "<think>",
             think_close: str = "</think>") -> bool:
    """Whether a response concluded: it stopped (not ``length``/``abort``) and closed every think block."""
    if finish_reason != "stop":
        return False
    return think_closed(response, think_open_at_end(prompt, think_open, think_close), think_open, think_close)


def grade(response: str, gold: str, finish_reason: str, *, prompt: str = "", think_open: str = "<think>",
          think_close: str = "</think>", truncated: TruncatedGrading = "wrong",
          extraction: AnswerExtraction = "boxed") -> bool:
    """Is ``response`` a correct answer to ``gold``?

    Args:
        response: the generated text (after the prompt).
        gold: the reference answer (plain or containing a ``\\boxed{}``).
        finish_reason: the engine's ``stop`` / ``length`` / ``abort`` (rollout.base.FinishReason).
        prompt: the rendered prompt text; only used to see whether it leaves a think block open.
        think_open, think_close: the think markers (config ``algo.segmentation.think_open/think_close``).
        truncated: ``wrong`` (default): ``length`` or an unclosed think block is wrong; ``grade``: graded on
            the whole text like a finished response. ``abort`` is wrong either way.
        extraction: ``boxed`` (default): the answer is the final ``\\boxed{}``, none is wrong; ``last_number``:
            without a box, the last number of the answer part (config ``data.answer_extraction``; answers.py
            rule 5).

    Raises:
        ValueError: an unknown ``truncated`` mode, finish reason or ``extraction``.
    """
    if truncated not in TRUNCATED_GRADING:
        raise ValueError(f"truncated grading {truncated!r}; choose one of {list(TRUNCATED_GRADING)}")
    check_extraction(extraction)
    if finish_reason not in ("stop", "length", "abort"):
        raise ValueError(f"finish_reason {finish_reason!r}; expected stop, length or abort")
    if finish_reason == "abort":
        return False
    if truncated == "wrong" and not finished(response, finish_reason, prompt=prompt, think_open=think_open,
                                             think_close=think_close):
        return False
    from megatron_scpo.data import answers  # module attribute: tests may replace answers.is_correct

    return bool(answers.is_correct(response, gold, extraction=extraction))


@dataclass(frozen=True)
class Grading:
    """``grade`` with the experiment config's settings bound (``rl.truncated_grading``, the think markers,
    ``data.answer_extraction``)."""

    truncated: TruncatedGrading = "wrong"
    think_open: str = "<think>"
    think_close: str = "</think>"
    extraction: AnswerExtraction = "boxed"

    @classmethod
    def from_config(cls, cfg: Any) -> Grading:
        """From an ExperimentConfig: ``rl.truncated_grading``, ``algo.segmentation.think_open/close`` and
        ``data.answer_extraction``."""
        seg = cfg.algo.segmentation
        return cls(truncated=cfg.rl.truncated_grading, think_open=seg.think_open, think_close=seg.think_close,
                   extraction=cfg.data.answer_extraction)

    def grade(self, response: str, gold: str, finish_reason: str, prompt: str = "") -> bool:
        return grade(response, gold, finish_reason, prompt=prompt, think_open=self.think_open,
                     think_close=self.think_close, truncated=self.truncated, extraction=self.extraction)
