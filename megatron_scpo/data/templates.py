"""Prompts: the text a rollout engine continues, and its token ids. The one home of prompt encoding.

``raw_think`` is LAPO's raw (no chat template) prompt ending in ``<think>`` (research/papers.md 2.3);
``chat`` goes through the tokenizer's chat template; ``synthetic`` is a compact raw prompt for the tiny
model of the embedded default, where a long system text would cost more tokens than the problem itself.
A length budget (LAPO stage 2) is appended right after ``<think>``, as in the paper.

Token ids (``encode_rendered`` / ``encode_prompt``; every stage, the eval and the preflight length check call
these, nothing else tokenizes prompts). The model's own tokenization decides the special tokens, never us:

- ``chat``: the rendered text is tokenized with ``add_special_tokens=False``, which is exactly what
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`` does (transformers
  renders, then calls ``tokenizer(text, add_special_tokens=False)``). A template that wants BOS writes it
  (R1-Distill: ``{{ bos_token }}...``) and gets it once; one that does not (ChatML: Qwen, SmolLM2) gets none.
  The old rule "BOS + encode(text)" gave R1-Distill two BOS and SmolLM2 a spurious ``<|im_start|>`` in front.
- raw templates: the tokenizer's own special-token prefix (``tokenizer(text)`` with its ``add_bos_token`` /
  post-processor: Llama and R1-Distill tokenizers add BOS, Qwen and SmolLM2 ones add nothing), never a
  special suffix (an EOS after a prompt would end the answer before it starts), and no second BOS when the
  text already starts with it. The task tokenizer (data/tokenizer.py) adds its BOS itself, so the tiny
  model's prompt ids are the same as before this rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

TemplateName = Literal["raw_think", "chat", "synthetic"]

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
RAW_THINK = (
    "You are a helpful assistant. A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process is enclosed within <think> </think> tags, respectively, i.e., "
    "<think> reasoning process here </think> answer here . User: {problem} Please think step by step and output "
    "the final answer within \\boxed{{}}. Assistant: <think>"
)
SYNTHETIC = "Problem: {problem}\nAnswer: <think>"
LENGTH_BUDGET = " I will answer the question with {n} tokens."  # same default as algo.config budget_template
TEMPLATES: tuple[str, ...] = ("raw_think", "chat", "synthetic")


class PromptTooLongError(ValueError):
    """A prompt's ids exceed ``data.max_prompt_tokens``; the message names the prompt, its length and the limit."""


def chat_messages(problem: str) -> list[dict[str, str]]:
    """The conversation the ``chat`` template renders: one user turn, the problem plus the boxed-answer instruction."""
    return [{"role": "user", "content": f"{problem} {INSTRUCTION}"}]


def render_prompt(problem: str, template: TemplateName = "raw_think", tokenizer: Any = None,
                  length_budget: int | None = None, budget_template: str = LENGTH_BUDGET) -> str:
    """Prompt text for ``problem``; ``chat`` needs a tokenizer with a chat template.

    Every template ends inside the reasoning part (after ``<think>``, or at the assistant turn for chat),
    so completions are parsed the same way whichever template produced them. ``budget_template`` must
    contain ``{n}`` (the LAPO config's ``budget_template`` is passed here).
    """
    if template == "raw_think":
        text = RAW_THINK.format(problem=problem)
    elif template == "synthetic":
        text = SYNTHETIC.format(problem=problem)
    elif template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template")
        text = tokenizer.apply_chat_template(chat_messages(problem), tokenize=False, add_generation_prompt=True)
    else:
        raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    if length_budget is not None:
        if length_budget < 0:
            raise ValueError(f"length_budget must be >= 0, got {length_budget}")
        if "{n}" not in budget_template:
            raise ValueError(f"budget_template must contain '{{n}}', got {budget_template!r}")
        text += budget_template.format(n=int(length_budget))
    return text


def _ids(enc: Any) -> list[int]:
    """``tokenizer(...)`` output (BatchEncoding, dict or list) -> a list of ints."""
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return [int(i) for i in ids]


def _find(seq: Sequence[int], sub: Sequence[int]) -> int:
    """First index of ``sub`` inside ``seq`` (-1 when absent)."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if list(seq[i : i + n]) == list(sub):
            return i
    return -1


def encode_rendered(text: str, template: TemplateName, tokenizer: Any, max_tokens: int | None = None,
                    name: str | None = None) -> list[int]:
    """Token ids of a rendered prompt ``text`` (``render_prompt`` output, possibly extended, e.g. by LAPO).

    ``chat``: ``tokenizer(text, add_special_tokens=False)`` == ``apply_chat_template(..., tokenize=True)``.
    Raw templates: the special prefix ``tokenizer(text)`` puts before the plain ids (found by comparing the two
    encodings; a special suffix is dropped) + the plain ids, unless the text already
    starts with those tokens. ``max_tokens``: raise PromptTooLongError (naming ``name`` or the text's start)
    when the ids are longer. Returns a list of ints (length = prompt tokens, specials included).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    plain = _ids(tokenizer(text, add_special_tokens=False))
    if template == "chat":
        ids = plain
    else:
        full = _ids(tokenizer(text, add_special_tokens=True))
        i = _find(full, plain) if plain else len(full)
        prefix = full[:i] if i > 0 else []
        ids = plain if (prefix and plain[: len(prefix)] == prefix) else prefix + plain
    if max_tokens is not None and len(ids) > max_tokens:
        what = f"prompt {name!r}" if name is not None else f"prompt {text[:60]!r}"
        raise PromptTooLongError(f"{what} has {len(ids)} tokens > data.max_prompt_tokens={max_tokens} "
                                 f"(template {template!r}, special tokens included)")
    return ids


def encode_prompt(problem: str, template: TemplateName, tokenizer: Any, length_budget: int | None = None,
                  budget_template: str = LENGTH_BUDGET, max_tokens: int | None = None,
                  name: str | None = None) -> list[int]:
    """``problem`` -> prompt token ids: ``render_prompt`` then ``encode_rendered`` (see the module docstring).

    For ``chat`` without a budget the ids equal ``tokenizer.apply_chat_template(chat_messages(problem),
    add_generation_prompt=True, tokenize=True)``. Raises ValueError for a bad template/budget and
    PromptTooLongError over ``max_tokens``.
    """
    text = render_prompt(problem, template, tokenizer, length_budget, budget_template)
    return encode_rendered(text, template, tokenizer, max_tokens=max_tokens, name=name)
