"""Prompt rendering: the text a rollout engine continues.

``raw_think`` is LAPO's raw (no chat template) prompt ending in ``<think>`` (research/papers.md 2.3);
``chat`` goes through the tokenizer's chat template; ``synthetic`` is a compact raw prompt for the tiny
model of the embedded default, where a long system text would cost more tokens than the problem itself.
A length budget (LAPO stage 2) is appended right after ``<think>``, as in the paper.
"""

from __future__ import annotations

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
        messages = [{"role": "user", "content": f"{problem} {INSTRUCTION}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    if length_budget is not None:
        if length_budget < 0:
            raise ValueError(f"length_budget must be >= 0, got {length_budget}")
        if "{n}" not in budget_template:
            raise ValueError(f"budget_template must contain '{{n}}', got {budget_template!r}")
        text += budget_template.format(n=int(length_budget))
    return text
