"""The arithmetic-chain task: generated problems/traces checked by recomputation, classification by hand."""

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_scpo.data import synthetic
from megatron_scpo.data.synthetic import (
    ArithmeticProblem,
    classify_steps,
    critical_redundant_tokens,
    generate_examples,
    parse_problem,
    token_kinds,
)

EQ = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def test_problem_by_hand():
    p = ArithmeticProblem(7, (("+", 5), ("*", 3), ("-", 4)))
    assert p.expression == "(7 + 5) * 3 - 4"
    assert p.values == (12, 36, 32) and p.answer == 32 and p.difficulty == 3
    assert p.operations() == [(7, "+", 5, 12), (12, "*", 3, 36), (36, "-", 4, 32)]
    assert parse_problem("(7 + 5) * 3 - 4") == p
    assert ArithmeticProblem(6, (("*", 2), ("+", 6), ("*", 2))).expression == "(6 * 2 + 6) * 2"
    assert eval("(6 * 2 + 6) * 2") == ArithmeticProblem(6, (("*", 2), ("+", 6), ("*", 2))).answer
    for bad in ["7 / 2", "x + 1", "7 + 1.5", "(7 +"]:
        with pytest.raises(ValueError):
            parse_problem(bad)


@given(seed=st.integers(0, 10**6), n_ops=st.integers(1, 6))
def test_sampled_problems_stay_in_range(seed, n_ops):
    p = synthetic.sample_problem(random.Random(seed), n_ops, max_operand=9, max_value=30)
    assert p.difficulty == n_ops
    assert all(0 <= v <= 30 for v in p.values)
    assert all(1 <= b <= 9 for _, b in p.ops) and 1 <= p.start <= 9
    assert eval(p.expression) == p.answer  # Python's precedence agrees with the parenthesised text
    assert parse_problem(p.expression) == p


def _known_numbers(problem: ArithmeticProblem, done: int) -> set[int]:
    nums = {problem.start, *(b for _, b in problem.ops), *problem.values[:done]}
    return nums | set(range(1, problem.difficulty + 1))  # "we still need to do k more steps"


def test_verbose_traces_critical_steps_and_no_information_in_redundant_ones():
    examples = generate_examples(120, "train", seed=3, min_ops=1, max_ops=4)
    assert {ex.problem.difficulty for ex in examples} == {1, 2, 3, 4}
    templates_seen = set()
    for ex in examples:
        p = ex.problem
        text = ex.verbose.text
        assert text.startswith("\n") and text.endswith(f"</think>\n\\boxed{{{p.answer}}}")
        crit = [s.text for s in ex.verbose.steps if s.kind == "critical"]
        assert crit == [s.text for s in ex.concise.steps]
        # Critical steps recomputed independently: a chain from the start value to the answer.
        cur = p.start
        for step, (op, b) in zip(crit, p.ops, strict=True):
            a, sop, sb, c = EQ.match(step).groups()
            assert (int(a), sop, int(sb)) == (cur, op, b)
            assert int(c) == eval(f"{a} {sop} {sb}")
            cur = int(c)
        assert cur == p.answer
        # 1-3 redundant steps per critical step; they only mention numbers already known at that point.
        kinds = [s.kind for s in ex.verbose.steps]
        n_red = kinds.count("redundant")
        assert p.difficulty <= n_red <= 3 * p.difficulty
        done = 0
        for s in ex.verbose.steps:
            if s.kind == "critical":
                done += 1
                continue
            assert s.kind == "redundant" and "\n\n" not in s.text
            assert {int(x) for x in re.findall(r"\d+", s.text)} <= _known_numbers(p, done), s.text
            templates_seen.add(re.sub(r"\d+|\(.*\)|[\d +\-*()]{5,}", "#", s.text))
        # Concise is strictly shorter; content-based classification agrees with the generator's labels.
        assert len(ex.concise.text) < len(text)
        assert classify_steps(p, text) == ex.verbose.labels()
        assert [k for _, k in classify_steps(p.expression, ex.concise.text)] == ["critical"] * p.difficulty + ["answer"]
    assert len(templates_seen) >= 10


def test_classify_known_text():
    text = (
        "\nLet me restate: (7 + 5) * 3 - 4.\n\n5 + 7 = 12\n\nLet me double-check 7 + 5 = 12.\n\n"
        "12 * 3 = 35\n\n\n12 * 3 = 36\n\nWait.\n\n4 - 36 = 32\n\n36 - 4 = 32\n</think>\n\\boxed{32}"
    )
    labels = classify_steps("(7 + 5) * 3 - 4", text)
    got = [(text[s:e], k) for (s, e), k in labels]
    assert got == [
        ("\nLet me restate: (7 + 5) * 3 - 4.\n\n", "redundant"),
        ("5 + 7 = 12\n\n", "critical"),  # commuted addition counts
        ("Let me double-check 7 + 5 = 12.\n\n", "redundant"),  # already done
        ("12 * 3 = 35\n\n\n", "redundant"),  # wrong value
        ("12 * 3 = 36\n\n", "critical"),
        ("Wait.\n\n", "redundant"),
        ("4 - 36 = 32\n\n", "redundant"),  # subtraction does not commute
        ("36 - 4 = 32\n", "critical"),
        ("</think>\n\\boxed{32}", "answer"),
    ]
    assert "".join(t for t, _ in got) == text
    # No </think>: everything is reasoning; a step may do two operations at once.
    labels = classify_steps("(7 + 5) * 3 - 4", "7 + 5 = 12 and 12 * 3 = 36\n\nok")
    assert [k for _, k in labels] == ["critical", "redundant"]
    assert classify_steps("1 + 2", "") == []
    assert classify_steps("1 + 2", "</think>3") == [((0, 9), "answer")]


def test_critical_redundant_tokens_by_hand():
    text = "\nWait.\n\n1 + 2 = 3\n</think>\n\\boxed{3}"
    per_char = [(i, i + 1) for i in range(len(text))] + [(0, 0)]  # a zero-width special token is ignored
    assert critical_redundant_tokens("1 + 2", text, per_char) == (len("1 + 2 = 3\n"), len("\nWait.\n\n"))
    # Coarser tokens: a token belongs to the step of its first character.
    offsets = [(0, 1), (1, 8), (8, 13), (13, 18), (18, len(text))]
    assert critical_redundant_tokens("1 + 2", text, offsets) == (2, 2)
    assert token_kinds("1 + 2", text, offsets + [(0, 0)]) == [
        "redundant", "redundant", "critical", "critical", "answer", None]


def test_splits_disjoint_and_deterministic():
    train = generate_examples(600, "train", seed=5)
    evals = generate_examples(100, "eval", seed=5)
    assert not {e.problem.expression for e in train} & {e.problem.expression for e in evals}
    assert all(synthetic.split_of(e.problem.expression) == "eval" for e in evals)
    again = generate_examples(100, "eval", seed=5)
    assert [e.verbose.text for e in again] == [e.verbose.text for e in evals]
    other = generate_examples(100, "eval", seed=6)
    assert [e.verbose.text for e in other] != [e.verbose.text for e in evals]
    assert len({e.id for e in train}) == 600
    with pytest.raises(ValueError, match="min_ops"):
        generate_examples(3, "train", min_ops=3, max_ops=2)
