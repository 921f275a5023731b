"""Answer extraction and checking: last ``\\boxed{...}`` after ``</think>``, integers fast, math-verify otherwise.

math-verify's default timeouts use ``signal.alarm``, which raises outside the main thread
(research/infra.md C). Off the main thread we disable them; callers that need a hard bound on sympy
time run checks in a process pool.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

THINK_CLOSE = "</think>"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INT = re.compile(r"[+-]?\d+")


def answer_part(response: str) -> str:
    """The text after the last ``</think>`` (the whole response when there is none)."""
    i = response.rfind(THINK_CLOSE)
    return response if i < 0 else response[i + len(THINK_CLOSE):]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces kept); None when absent or unclosed."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{" and text[i - 1] != "\\":
                depth += 1
            elif c == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _as_int(text: str) -> int | None:
    t = text.strip().strip("$").strip().replace(",", "")
    if t.startswith("\\text{") and t.endswith("}"):
        t = t[6:-1].strip()
    return int(t) if _INT.fullmatch(t) else None


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    import math_verify  # lazy: 0.5 s import, only needed off the integer path

    return math_verify


def _latex(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def is_correct(response: str, gold: str, require_boxed: bool = True) -> bool:
    """Whether ``response`` answers ``gold``.

    Only the part after ``</think>`` is read. The last boxed answer is compared: as integers when both
    sides are integers (the synthetic task; no sympy), else with math-verify (``\\frac{1}{2}`` == 0.5).
    ``gold`` may itself be a full solution with a ``\\boxed{}``. Without a box the answer is wrong unless
    ``require_boxed`` is False, then math-verify searches the whole answer part.
    """
    gold_text = extract_boxed(gold) or gold.strip()
    pred_text = extract_boxed(answer_part(response))
    if pred_text is None:
        if require_boxed:
            return False
        pred_text = answer_part(response)
    g, p = _as_int(gold_text), _as_int(pred_text)
    if g is not None and p is not None:
        return g == p
    mv = _math_verify()
    main = threading.current_thread() is threading.main_thread()
    timeout = {} if main else {"parsing_timeout": None}
    try:
        gold_parsed = mv.parse(_latex(gold_text), **timeout)
        pred_parsed = mv.parse(_latex(pred_text), **timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, **({} if main else {"timeout_seconds": None})))
    except Exception:  # math-verify raising on odd input means "not verified", never a crashed reward worker
        return False
