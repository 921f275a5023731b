"""Answer extraction and checking (integer fast path, math-verify, thread safety)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_scpo.data.answers import answer_part, extract_boxed, is_correct

CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "$0.5$", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),
    ("\n7 + 5 = 12\n</think>\n\\boxed{12}", "12", True),
    ("\n7 + 5 = 12 \\boxed{12}\n</think>\n\\boxed{13}", "12", False),  # only the part after </think>
    ("\\boxed{12} wait </think> no box", "12", False),
    ("The answer is 42", "42", False),  # no box
    ("\\boxed{1} then \\boxed{2}", "2", True),  # last box
    ("\\boxed{ 1,000 }", "1000", True),
    ("\\boxed{-4}", "-4", True),
    ("\\boxed{\\text{5}}", "5", True),
    ("\\boxed{5}", "Step... so \\boxed{5}.", True),  # gold given as a full solution
    ("\\boxed{5", "5", False),  # unclosed
    ("\\boxed{}", "5", False),
]


@pytest.mark.parametrize("response, gold, expected", CASES)
def test_is_correct(response, gold, expected):
    assert is_correct(response, gold) is expected


def test_extract_boxed():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert extract_boxed("\\boxed{\\frac{a}{b^{c}}}") == "\\frac{a}{b^{c}}"
    assert extract_boxed("\\boxed{\\{1\\}}") == "\\{1\\}"
    assert extract_boxed("\\boxed{3") is None and extract_boxed("none") is None
    assert extract_boxed("\\fbox{7}") == "7"
    assert answer_part("a </think> b </think> c") == " c" and answer_part("abc") == "abc"
    assert is_correct("The answer is 42", "42", require_boxed=False)


def test_thread_pool_workers_do_not_raise():
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: is_correct(c[0], c[1]), CASES))
    assert got == [c[2] for c in CASES]
