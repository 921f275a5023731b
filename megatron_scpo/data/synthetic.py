"""The synthetic arithmetic-chain task of the embedded default (DESIGN.md section 4).

A problem is a left-to-right chain such as ``(7 + 5) * 3 - 4``; difficulty = number of operations.
A *verbose* solution puts one critical step per operation (``7 + 5 = 12``) among 1-3 redundant steps
(restating, double-checks, "wait", summaries) separated by blank lines, inside ``<think> ... </think>``,
then ``\\boxed{answer}``. The redundant steps only repeat what is already known, so the length is
genuinely compressible and a good length-control method should remove them and keep the critical ones.

``classify_steps`` labels steps of *any* text (model outputs included) by content, not by template, so
the trainer can count tokens spent in critical vs redundant steps of generated responses.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

StepKind = Literal["critical", "redundant", "answer"]
Span = tuple[int, int]

STEP_DELIMITER = "\n\n"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
OPS = ("+", "-", "*")
_OP_FUNCS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
# An equation ``a op b = c`` anywhere in a step; "x" and the multiplication sign count as "*".
_EQUATION = re.compile(r"(\d+)\s*([+\-*x\u00d7])\s*(\d+)\s*=\s*(\d+)")


@dataclass(frozen=True)
class ArithmeticProblem:
    """``start op_1 b_1 op_2 b_2 ...`` evaluated left to right; ``values[i]`` is the value after op i."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def difficulty(self) -> int:
        return len(self.ops)

    @property
    def values(self) -> tuple[int, ...]:
        cur, out = self.start, []
        for op, b in self.ops:
            cur = _OP_FUNCS[op](cur, b)
            out.append(cur)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.values[-1] if self.ops else self.start

    def operations(self) -> list[tuple[int, str, int, int]]:
        """``(a, op, b, c)`` for each operation in order: what a critical step must compute."""
        out, cur = [], self.start
        for (op, b), c in zip(self.ops, self.values):
            out.append((cur, op, b, c))
            cur = c
        return out

    @property
    def expression(self) -> str:
        """Infix text with the parentheses left-to-right evaluation needs (``(7 + 5) * 3 - 4``)."""
        text, top = str(self.start), None
        for op, b in self.ops:
            if op == "*" and top in ("+", "-"):
                text = f"({text})"
            text, top = f"{text} {op} {b}", op
        return text


def parse_problem(expression: str) -> ArithmeticProblem:
    """Inverse of ``ArithmeticProblem.expression`` (so records that only carry text can be classified)."""
    try:
        node = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"not an arithmetic chain: {expression!r}") from None
    ops: list[tuple[str, int]] = []
    while isinstance(node, ast.BinOp):
        op = _AST_OPS.get(type(node.op))
        right = node.right
        if op is None or not (isinstance(right, ast.Constant) and type(right.value) is int):
            raise ValueError(f"not an arithmetic chain of + - * with integer operands: {expression!r}")
        ops.append((op, right.value))
        node = node.left
    if not (isinstance(node, ast.Constant) and type(node.value) is int):
        raise ValueError(f"not an arithmetic chain of + - * with integer operands: {expression!r}")
    return ArithmeticProblem(node.value, tuple(reversed(ops)))


# ---------------------------------------------------------------------------------------------------------
# Problem generation


def sample_problem(rng: random.Random, n_ops: int, max_operand: int = 9, max_value: int = 50) -> ArithmeticProblem:
    """Random chain with ``n_ops`` operations; every intermediate value stays in ``[0, max_value]``."""
    if n_ops < 1:
        raise ValueError(f"n_ops must be >= 1, got {n_ops}")
    if max_operand < 2 or max_value < 2 * max_operand:
        raise ValueError(f"need max_operand >= 2 and max_value >= 2 * max_operand, got {max_operand}, {max_value}")
    cur = rng.randint(1, max_operand)
    start, ops = cur, []
    for _ in range(n_ops):
        choices = []
        if cur + 1 <= max_value:
            choices.append(("+", 1, min(max_operand, max_value - cur)))
        if cur >= 1:
            choices.append(("-", 1, min(max_operand, cur)))
        if cur >= 1 and 2 * cur <= max_value:
            choices.append(("*", 2, min(max_operand, max_value // cur)))
        op, lo, hi = rng.choice(choices)
        b = rng.randint(lo, hi)
        ops.append((op, b))
        cur = _OP_FUNCS[op](cur, b)
    return ArithmeticProblem(start, tuple(ops))


def _bucket(expression: str) -> int:
    """Stable 0..99 hash bucket: fixes each problem's split independent of seed and set sizes."""
    return int.from_bytes(hashlib.sha1(expression.encode()).digest()[:4], "big") % 100


def split_of(expression: str, eval_percent: int = 10) -> Literal["train", "eval"]:
    """Problems hashing below ``eval_percent`` belong to eval only, so train and eval never overlap."""
    return "eval" if _bucket(expression) < eval_percent else "train"


# ---------------------------------------------------------------------------------------------------------
# Solution traces

# Redundant step templates. "pre" ones fit before the i-th critical step, "post" ones after it. None of
# them contains a new computation: they restate the problem or repeat results that are already known.
_PRE_TEMPLATES = (
    "Let me restate the problem: {expr}.",
    "The problem asks for the value of {expr}.",
    "Wait.",
    "Wait, let me think about this again.",
    "Let me be careful here.",
    "Now let me continue with the next operation.",
    "We still need to do {left} more steps.",
    "Hmm, let me look at the problem again.",
)
_POST_TEMPLATES = (
    "Let me double-check {a} {op} {b} = {c}.",
    "Let me check that again: {a} {op} {b} is {c}.",
    "So far we have {c}.",
    "Hmm, that looks right.",
    "Good, the current value is {c}.",
    "Okay, let me make sure I have not made a mistake.",
    "Wait.",
    "So the result of this step is {c}.",
)
REDUNDANT_TEMPLATES = tuple(dict.fromkeys(_PRE_TEMPLATES + _POST_TEMPLATES))


@dataclass(frozen=True)
class TraceStep:
    text: str
    kind: StepKind


@dataclass(frozen=True)
class SolutionTrace:
    """A completion (the text generated after the prompt's ``<think>``) with its step labels."""

    steps: tuple[TraceStep, ...]
    answer: str

    @property
    def text(self) -> str:
        return render_completion([s.text for s in self.steps if s.kind != "answer"], self.answer)

    def labels(self) -> list[tuple[Span, StepKind]]:
        """Character spans of ``text`` per step (same tiling as ``classify_steps``)."""
        return classify_steps(None, self.text, kinds=[s.kind for s in self.steps if s.kind != "answer"])


def render_completion(reasoning_steps: Sequence[str], answer: str) -> str:
    """``\\n step \\n\\n step ... \\n</think>\\n\\boxed{answer}``: the prompt already ends in ``<think>``."""
    return "\n" + STEP_DELIMITER.join(reasoning_steps) + f"\n{THINK_CLOSE}\n\\boxed{{{answer}}}"


def _critical_text(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def concise_trace(problem: ArithmeticProblem) -> SolutionTrace:
    """Critical steps only: the reference for "fully compressed" reasoning."""
    steps = tuple(TraceStep(_critical_text(*o), "critical") for o in problem.operations())
    return SolutionTrace(steps, str(problem.answer))


def verbose_trace(problem: ArithmeticProblem, rng: random.Random, min_redundant: int = 1,
                  max_redundant: int = 3) -> SolutionTrace:
    """Every critical step surrounded by ``min..max_redundant`` redundant steps (random templates/places)."""
    steps: list[TraceStep] = []
    ops = problem.operations()
    for i, (a, op, b, c) in enumerate(ops):
        n_red = rng.randint(min_redundant, max_redundant)
        n_pre = rng.randint(0, n_red)
        fields = {"expr": problem.expression, "a": a, "op": op, "b": b, "c": c, "left": len(ops) - i}
        pre = _pick(rng, _PRE_TEMPLATES, n_pre, fields, skip_steps_left=len(ops) - i < 2)
        post = _pick(rng, _POST_TEMPLATES, n_red - n_pre, fields, skip_steps_left=True)
        steps += [TraceStep(t, "redundant") for t in pre]
        steps.append(TraceStep(_critical_text(a, op, b, c), "critical"))
        steps += [TraceStep(t, "redundant") for t in post]
    return SolutionTrace(tuple(steps), str(problem.answer))


def _pick(rng: random.Random, templates: Sequence[str], n: int, fields: dict, skip_steps_left: bool) -> list[str]:
    pool = [t for t in templates if not (skip_steps_left and "{left}" in t)]
    return [t.format(**fields) for t in rng.sample(pool, n)]


# ---------------------------------------------------------------------------------------------------------
# Step classification of arbitrary text


def _segment(text: str) -> tuple[list[Span], int]:
    """Reasoning step spans (each runs up to the next step, delimiter included) and where the answer starts."""
    close = text.find(THINK_CLOSE)
    end = close if close >= 0 else len(text)
    spans, start = [], 0
    for m in re.finditer(re.escape(STEP_DELIMITER) + "+", text[:end]):
        if text[start:m.start()].strip():
            spans.append((start, m.end()))
            start = m.end()
        elif spans:  # a blank-only chunk joins the previous step so the spans tile the text
            spans[-1] = (spans[-1][0], m.end())
            start = m.end()
    if start < end:
        if text[start:end].strip() or not spans:
            spans.append((start, end))
        else:
            spans[-1] = (spans[-1][0], end)
    return spans, end


def classify_steps(problem: ArithmeticProblem | str | None, text: str,
                   kinds: Sequence[StepKind] | None = None) -> list[tuple[Span, StepKind]]:
    """Label every step of a completion: ``[((start, end), kind), ...]`` tiling ``text`` in order.

    Steps are split at blank lines before ``</think>`` (everything from ``</think>`` on is the "answer"
    step). A step is critical if it contains a correct ``a op b = c`` for one of the problem's operations
    not done by an earlier step (commuted ``+``/``*`` accepted); otherwise it is redundant. ``kinds``
    bypasses the check with known labels (used for generated traces).
    """
    if isinstance(problem, str):
        problem = parse_problem(problem)
    spans, answer_start = _segment(text)
    if kinds is not None:
        if len(kinds) != len(spans):
            raise ValueError(f"{len(kinds)} labels for {len(spans)} steps")
        out = list(zip(spans, kinds))
    else:
        if problem is None:
            raise ValueError("classify_steps needs a problem unless kinds are given")
        todo = problem.operations()
        out = []
        for span in spans:
            kind: StepKind = "redundant"
            for m in _EQUATION.finditer(text[span[0]:span[1]]):
                hit = _match_operation(todo, int(m[1]), m[2], int(m[3]), int(m[4]))
                if hit is not None:
                    todo.pop(hit)
                    kind = "critical"
            out.append((span, kind))
    if answer_start < len(text):
        out.append(((answer_start, len(text)), "answer"))
    return out


def _match_operation(todo: list[tuple[int, str, int, int]], a: int, op: str, b: int, c: int) -> int | None:
    op = "*" if op in ("x", "\u00d7") else op
    for i, (oa, oop, ob, oc) in enumerate(todo):
        if op == oop and c == oc and ((a, b) == (oa, ob) or (op != "-" and (b, a) == (oa, ob))):
            return i
    return None


def token_kinds(problem: ArithmeticProblem | str, text: str,
                offsets: Sequence[tuple[int, int]]) -> list[StepKind | None]:
    """Step kind of every token of ``text`` given its character ``offsets``; None for zero-width tokens.

    A token belongs to the step holding its first character (a ``.\\n\\n`` token ends its step).
    """
    labels = classify_steps(problem, text)
    out: list[StepKind | None] = []
    j = 0
    for start, end in offsets:
        if end <= start:
            out.append(None)
            continue
        while j < len(labels) and labels[j][0][1] <= start:
            j += 1
        out.append(labels[j][1] if j < len(labels) else None)
    return out


def critical_redundant_tokens(problem: ArithmeticProblem | str, text: str,
                              offsets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(n_critical, n_redundant)`` tokens of ``text``; answer and zero-width (special) tokens count as neither."""
    kinds = token_kinds(problem, text, offsets)
    return kinds.count("critical"), kinds.count("redundant")


# ---------------------------------------------------------------------------------------------------------
# Datasets of the task


@dataclass(frozen=True)
class SyntheticExample:
    id: str
    problem: ArithmeticProblem
    verbose: SolutionTrace
    concise: SolutionTrace
    split: str = "train"
    meta: dict = field(default_factory=dict, compare=False)


def generate_examples(n: int, split: Literal["train", "eval"], seed: int = 0, min_ops: int = 1, max_ops: int = 4,
                      max_operand: int = 9, max_value: int = 50, eval_percent: int = 10) -> list[SyntheticExample]:
    """``n`` examples of one split, deterministic in ``seed``; train and eval problems never coincide.

    Difficulties cycle through ``min_ops..max_ops`` so every level is equally represented. Within a split,
    problems are unique while the (small) pool of a difficulty allows it.
    """
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    rng = random.Random(f"arith:{seed}:{split}")
    seen: set[str] = set()
    out = []
    for i in range(n):
        n_ops = min_ops + i % (max_ops - min_ops + 1)
        for attempt in range(2000):
            p = sample_problem(rng, n_ops, max_operand, max_value)
            expr = p.expression
            if split_of(expr, eval_percent) == split and (expr not in seen or attempt >= 200):
                break
        else:
            raise ValueError(f"no {split} problem with {n_ops} ops found; raise eval_percent or max_value")
        seen.add(expr)
        trace_rng = random.Random(f"trace:{seed}:{split}:{i}")
        out.append(SyntheticExample(f"arith-{split}-{i}", p, verbose_trace(p, trace_rng), concise_trace(p), split))
    return out
