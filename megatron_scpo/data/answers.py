"""Answer extraction and checking: final ``\\boxed{...}`` after ``</think>``, exact numbers fast, math-verify otherwise.

Pipeline of :func:`is_correct` (each rule is a row of tests/data/test_data_answer_table.py):

1. Only the text after the last ``</think>`` is read. The final answer is the last ``\\boxed{}``; boxes
   right before it joined only by separators (``,`` ``;`` ``and`` ``or``, spacing, ``$``, a variable name
   ``y =``) are part of it
   (``\\boxed{1}, \\boxed{2}`` is the list ``1, 2``; a hedge ``\\boxed{1} or \\boxed{2}`` is not ``2``).
2. :func:`normalize_answer` removes only what cannot change the value: outer math delimiters, ``\\left``/
   ``\\right``, ``\\dfrac``/``\\tfrac``, spacing commands, degrees, the currency sign ``\\$`` (an escaped dollar is
   currency, never a math delimiter), a trailing period, a whole-answer ``\\text{}``. Digit-group separators
   (``,`` ``{,}`` ``\\,`` thin space) are removed only in a well-formed thousands grouping of a single number
   (``1,234,567``); ``1,2`` stays a list of two numbers and never equals ``12``.
3. Both sides plain numbers: exact rational comparison (``1.50`` == ``3/2`` via math-verify, ``1.000`` == ``1``
   here); a percent matches its number or its hundredth (``50\\%`` == ``50`` == ``0.5``). Both sides words
   (``Yes``, ``(B)``): case-insensitive comparison. Anything else: math-verify on ``$normalized$``.
4. A gold answer may list alternatives separated by :data:`ALT_SEP` (the dataset loader joins a JSON list
   answer with it; the CHAMP converter writes "C(10, 5), or equivalently 252" as two alternatives): any
   alternative matching is correct.
5. Without a box: wrong (``extraction="boxed"``, the default), or the last number of the answer part is the
   answer (``extraction="last_number"``, for models that do not box: lm-eval's ``flexible-extract``, verl's
   gsm8k ``method="flexible"``; an empty box counts as none), or (``require_boxed=False``) a free-text reading
   (bare number/word, leading Yes/No, math-verify's extraction).

Source: the normalizations follow the MATH/PRM800K grader (hendrycks/math ``is_equiv``) and math-verify's
own LaTeX normalization (huggingface/Math-Verify ``latex2sympy2_extended`` / ``parser.py``), minus the
global comma stripping of the old ``_as_int`` (issue 11 item 5).

math-verify's default timeouts use ``signal.alarm``, which raises outside the main thread
(research/infra.md C). Off the main thread we disable them; callers that need a hard bound on sympy
time run checks in a process pool.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal, get_args

THINK_CLOSE = "</think>"
ALT_SEP = " ||| "  # separates alternative gold answers in PromptRecord.answer
AnswerExtraction = Literal["boxed", "last_number"]
ANSWER_EXTRACTIONS: tuple[str, ...] = get_args(AnswerExtraction)


def check_extraction(extraction: str) -> None:
    """ValueError naming the choices for an unknown ``data.answer_extraction`` mode."""
    if extraction not in ANSWER_EXTRACTIONS:
        raise ValueError(f"answer extraction {extraction!r}; choose one of {list(ANSWER_EXTRACTIONS)}")


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUM = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC = re.compile(r"([+-]?)\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}|([+-]?)(\d+)\s*/\s*(\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:(?:,|\{,\}|\\,|\\ |\s)\d{3})+(?:\.\d+)?")
_GROUP_SEP = re.compile(r",|\{,\}|\\,|\\ |\s")
# Between chained boxes: spacing, punctuation, "and"/"or", math delimiters, \text{ and }.
_BOX_JOIN = re.compile(
    r"(?:\s|[,;$]|\\[,;:!]|\\quad|\\qquad|\\text\{\s*(?:(?:and|or|,)\s*)?\}|\band\b|\bor\b|&|\\\\"
    r"|\b[A-Za-z](?:_\{?\w+\}?)?\s*=)*"  # "x = \boxed{3}, y = \boxed{4}": the next box's variable name
)
# A number in running text: a thousands grouping, a decimal or an integer; a minus sign only where it cannot be a
# subtraction ("8-3" ends in 3, not -3). A trailing sentence period is not part of it ("is 11." is 11).
_LAST_NUM = re.compile(r"(?:(?<![\w)\]}.])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
_WORD = re.compile(r"[A-Za-z][A-Za-z\s'.-]*")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{")


def answer_part(response: str) -> str:
    """The text after the last ``</think>`` (the whole response when there is none)."""
    i = response.rfind(THINK_CLOSE)
    return response if i < 0 else response[i + len(THINK_CLOSE):]


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """Every closed ``\\boxed{...}``: (start of the command, end after its brace, content). One pass (O(n))."""
    close_of: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(text):
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            stack.append(i)
        elif c == "}" and (i == 0 or text[i - 1] != "\\") and stack:
            close_of[stack.pop()] = i
    out = []
    for m in _BOXED.finditer(text):
        j = close_of.get(m.end() - 1)
        if j is not None:
            out.append((m.start(), j + 1, text[m.end():j].strip()))
    return out


def extract_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` (nested braces kept); None when absent or unclosed."""
    boxes = _boxes(text)
    # a box nested inside a later one's content is not "last": keep the outermost box ending last
    return max(boxes, key=lambda b: (b[1], -b[0]))[2] if boxes else None


def extract_final_answer(text: str) -> str | None:
    """The final boxed answer: the last box plus boxes chained right before it (``\\boxed{1}, \\boxed{2}``)."""
    boxes: list[tuple[int, int, str]] = []
    for b in _boxes(text):  # in start order; boxes nest or are disjoint: keep the outermost only
        if not boxes or b[0] >= boxes[-1][1]:
            boxes.append(b)
    if not boxes:
        return None
    chain = [boxes[-1]]
    for b in reversed(boxes[:-1]):
        if _BOX_JOIN.fullmatch(text[b[1]:chain[0][0]]) is None:
            break
        chain.insert(0, b)
    return ", ".join(b[2] for b in chain)


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (``-3``, ``1,234``, ``2.5``; ``\\$`` and ``$`` around it ignored); None without one.

    Digits inside a word or an identifier (``x2``, ``3rd``) are not numbers; ``8-3`` gives ``3``; a fraction
    ``3/4`` gives ``4`` (use ``\\boxed{}`` for non-integer answers).
    """
    nums = _LAST_NUM.findall(text.replace("\\$", " ").replace("$", " "))
    return nums[-1] if nums else None


def _unwrap(text: str, cmd: re.Pattern[str]) -> str:
    """Remove ``\\text{`` style wrappers, keeping their (brace-balanced) content."""
    out, i = [], 0
    for m in list(cmd.finditer(text)):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            break
        out.append(text[i:m.start()])
        out.append(text[m.end():j - 1])
        i = j
    out.append(text[i:])
    return "".join(out)


def _strip_delims(t: str) -> str:
    changed = True
    while changed:
        changed = False
        t = t.strip()
        for a, b in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
            if len(t) >= len(a) + len(b) and t.startswith(a) and t.endswith(b) and not t.endswith("\\" + b):
                t, changed = t[len(a):len(t) - len(b)], True
                break
    return t


def normalize_answer(text: str) -> str:
    """An answer string with value-preserving LaTeX noise removed (module docstring, rule 2)."""
    t = _strip_delims(text)
    t = t.replace("\\$", "")  # currency: an escaped dollar is never a math delimiter
    if t.count("$") == 1 and re.search(r"\$\s*\d", t):  # a bare currency sign: "$18.90"
        t = t.replace("$", "")
    t = _strip_delims(t)
    t = re.sub(r"\\(?:left|right)(?=[\s()\[\]|.{}\\])", "", t)
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    t = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°", "", t)
    t = re.sub(r"\\(?:displaystyle|qquad|quad)(?![A-Za-z])|\\[!;:]", " ", t).replace("~", " ")
    if _THOUSANDS.fullmatch(t.strip()):
        t = _GROUP_SEP.sub("", t.strip())
    t = t.replace("\\,", " ").strip()
    whole_text = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox)\s*\{(.*)\}", t, flags=re.S)
    if whole_text and "{" not in whole_text.group(1):
        t = whole_text.group(1).strip()
    t = re.sub(r"\s+", " ", t).strip()
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1].strip()  # sentence period ("12." is 12)
    return t


def _number(t: str) -> Fraction | None:
    """Exact value of a plain number (``-12``, ``3.50``, ``\\frac{1}{2}``, ``3/4``); None otherwise."""
    t = t.replace(" ", "")
    if _NUM.fullmatch(t):
        return Fraction(t)
    m = _FRAC.fullmatch(t)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), m.group(6))
        if int(den) == 0:
            return None
        v = Fraction(int(num), int(den))
        return -v if sign == "-" else v
    return None


def _percent(t: str) -> tuple[str, bool]:
    m = re.fullmatch(r"(.*?)\s*(?:\\%|%|\\text\{\s*%\s*\}|\s*percent)", t)
    return (m.group(1).strip(), True) if m else (t, False)


def _words(t: str) -> str | None:
    """A purely verbal answer (``Yes``, ``(B)``, ``\\text{No}``) lower-cased; None when it has math in it."""
    t = _unwrap(t, _TEXT_CMD).strip().strip("()").strip()
    return t.lower().rstrip(".") if t and _WORD.fullmatch(t) and len(t) > 0 else None


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    import math_verify  # lazy: 0.5 s import, only needed off the exact-number path

    return math_verify


def _mv_equal(gold: str, pred: str, pred_is_free_text: bool = False) -> bool:
    mv = _math_verify()
    main = threading.current_thread() is threading.main_thread()
    timeout = {} if main else {"parsing_timeout": None}
    try:
        gold_parsed = mv.parse(f"${gold}$", **timeout)
        pred_parsed = mv.parse(pred if pred_is_free_text else f"${pred}$", **timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, **({} if main else {"timeout_seconds": None})))
    except Exception:  # math-verify raising on odd input means "not verified", never a crashed reward worker
        return False


def _fast_equal(p: str, g: str) -> bool | None:
    """Verdict on normalized answers from exact numbers, percents and words; None when math-verify must decide."""
    (pb, pp), (gb, gp) = _percent(p), _percent(g)
    if pp or gp:
        pv, gv = _number(pb), _number(gb)
        if pv is not None and gv is not None:
            return pv == gv or (pp and not gp and pv / 100 == gv) or (gp and not pp and gv / 100 == pv)
    pv, gv = _number(p), _number(g)
    if pv is not None and gv is not None:
        return pv == gv
    pw, gw = _words(p), _words(g)
    if pw is not None and gw is not None:
        return pw == gw
    if (pw is not None and len(pw) > 1) or (gw is not None and len(gw) > 1):
        return False  # "Yes" vs "1": a word against math never matches (math-verify reads yes as y*e*s)
    return None


def answers_equal(pred: str, gold: str) -> bool:
    """Whether two final-answer strings (box contents, not whole responses) are equal (rule 3)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    fast = _fast_equal(p, g)
    return fast if fast is not None else _mv_equal(g, p)


def gold_alternatives(gold: str) -> list[str]:
    """The acceptable final answers of ``gold``: its box (if a full solution) or its text, split at ALT_SEP."""
    out = []
    for alt in gold.split(ALT_SEP):
        a = extract_final_answer(alt) or alt.strip()
        if a:
            out.append(a)
    return out


def is_correct(response: str, gold: str, require_boxed: bool = True, *,
               extraction: AnswerExtraction = "boxed") -> bool:
    """Whether ``response`` answers ``gold``.

    Only the part after ``</think>`` is read. The final boxed answer (rule 1) is compared with each gold
    alternative (rule 4) by :func:`answers_equal`. ``gold`` may itself be a full solution with a ``\\boxed{}``.
    Without a box (rule 5):

    - ``extraction="last_number"``: the last number of the answer part (:func:`extract_last_number`) is the
      answer, compared by :func:`answers_equal`; no number is wrong (``require_boxed`` does not apply). An empty
      ``\\boxed{}`` counts as no box here (small models copy the instruction's empty box).
    - ``extraction="boxed"`` (default): wrong unless ``require_boxed`` is False; then a bare number or word is
      compared as above, a leading "Yes,"/"No." answers a yes/no gold, and otherwise math-verify extracts the
      answer from the whole answer part (its last ``$...$`` expression or number).

    Raises:
        ValueError: an unknown ``extraction``.
    """
    check_extraction(extraction)
    golds = gold_alternatives(gold)
    if not golds:
        return False
    part = answer_part(response)
    pred = extract_final_answer(part)
    if pred is not None and (pred or extraction == "boxed"):
        return any(answers_equal(pred, g) for g in golds)
    if extraction == "last_number":  # no box, or only an empty one ("the answer is \\boxed{} 17")
        num = extract_last_number(part)
        return num is not None and any(answers_equal(num, g) for g in golds)
    if require_boxed:
        return False
    free = part.replace("\\$", "")
    lead = re.match(r"\s*(yes|no)(?:[,.;:!]|\s*$)", free, flags=re.I)  # "Yes, because ..." answers a yes/no gold
    gold_words = {_words(normalize_answer(g)) for g in golds}
    if lead and gold_words & {"yes", "no"}:
        return lead.group(1).lower() in gold_words
    short = normalize_answer(free)
    if _number(short) is not None or _words(short) is not None or _percent(short)[1]:
        return any(bool(_fast_equal(short, normalize_answer(g))) for g in golds)  # a bare "42" or "Yes"
    return any(_mv_equal(normalize_answer(g), free, pred_is_free_text=True) for g in golds)
