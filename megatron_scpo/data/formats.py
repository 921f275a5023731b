"""Public math dataset formats -> our JSONL records (``problem``, ``answer``, ``id``, optional extras).

Formats (row layouts as published; the converters read only the fields named here):

* ``gsm8k`` -- openai/grade-school-math ``{"question", "answer"}``; the answer field is a worked solution
  ending in a line ``#### 72``; the number after ``####`` is the gold answer, the rest is kept as ``solution``.
* ``math`` -- hendrycks/MATH ``{"problem", "solution", "level", "type"}`` (the gold is the last ``\\boxed{}`` of
  the solution) and MATH-500 (HuggingFaceH4/MATH-500: the same plus ``answer`` and ``unique_id``; ``answer`` wins).
* ``aime`` -- AIME-style integer answers (AI-MO/aimo-validation-aime ``{"id", "problem", "answer", ...}``,
  Maxwell-Jia/AIME_2024 ``{"ID", "Problem", "Answer", "Solution"}``); the answer must be an integer 0..999.
* ``deepscaler`` -- agentica-org/DeepScaleR-Preview-Dataset ``{"problem", "answer", "solution"}``; an empty
  ``answer`` falls back to the solution's last ``\\boxed{}``.
* ``jsonl`` -- our own format, unchanged (the loader's field auto-detection applies).
* ``champ`` -- the CHAMP dataset (Mao et al. 2024, arXiv:2406.18321; PyPI ``champ-dataset``, MIT), read from
  the installed package (or a CHAMP ``.json`` file) by :func:`champ_records`, not row by row.

Alternative gold answers are written as a JSON list (``"answer": ["\\\\binom{10}{5}", "252"]``); the loader
joins them with :data:`~megatron_scpo.data.answers.ALT_SEP` and ``is_correct`` accepts any of them.
A bad row raises :class:`~megatron_scpo.data.datasets.DataError` naming the file, line and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron_scpo.atomic import write_text_atomic
from megatron_scpo.data.answers import extract_boxed

ROW_FORMATS = ("jsonl", "gsm8k", "math", "aime", "deepscaler")
FORMATS = (*ROW_FORMATS, "champ")


class FormatError(ValueError):
    """A row that does not fit its declared format; the message names the field (the caller adds file:line)."""


def _field(row: dict, names: tuple[str, ...], what: str) -> tuple[str, Any]:
    for n in names:
        if n in row and row[n] is not None:
            return n, row[n]
    raise FormatError(f"missing {what} field; expected one of {list(names)} (fields: {sorted(row)})")


def _text(row: dict, names: tuple[str, ...], what: str) -> tuple[str, str]:
    k, v = _field(row, names, what)
    if not isinstance(v, str) or not v.strip():
        raise FormatError(f"field {k!r} must be a non-empty string, got {v!r}")
    return k, v.strip()


def _id(row: dict, names: tuple[str, ...] = ("id", "ID", "unique_id", "uid", "idx")) -> dict[str, str]:
    for n in names:
        if n in row and row[n] is not None and str(row[n]).strip():
            return {"id": str(row[n])}
    return {}


def gsm8k_row(row: dict) -> dict[str, Any]:
    """``{"question", "answer": "...\\n#### 72"}`` -> problem, answer "72", solution (the worked text)."""
    _, q = _text(row, ("question", "problem"), "question")
    k, a = _text(row, ("answer",), "answer")
    m = re.search(r"####\s*(.+?)\s*$", a)
    if m is None:
        raise FormatError(f"field {k!r} has no final '#### <answer>' line")
    gold = m.group(1).strip()
    return {"problem": q, "answer": gold, **_id(row), "solution": a[:m.start()].rstrip()}


def math_row(row: dict) -> dict[str, Any]:
    """MATH / MATH-500: ``answer`` if present, else the last ``\\boxed{}`` of ``solution``."""
    _, p = _text(row, ("problem", "question"), "problem")
    out: dict[str, Any] = {"problem": p}
    if isinstance(row.get("answer"), (str, int)) and str(row["answer"]).strip():
        out["answer"] = str(row["answer"]).strip()
    else:
        k, sol = _text(row, ("solution",), "answer or solution")
        boxed = extract_boxed(sol)
        if not boxed:
            raise FormatError(f"field {k!r} has no closed \\boxed{{...}} answer (and no 'answer' field)")
        out["answer"] = boxed
    out.update(_id(row))
    for extra in ("level", "type", "subject"):
        if extra in row:
            out[extra] = row[extra]
    return out


def aime_row(row: dict) -> dict[str, Any]:
    """AIME-style: the answer must be an integer 0..999 (``"045"`` and ``45`` are both 45)."""
    _, p = _text(row, ("problem", "Problem", "question"), "problem")
    k, a = _field(row, ("answer", "Answer"), "answer")
    s = str(a).strip()
    if isinstance(a, bool) or not re.fullmatch(r"\d{1,3}", s):
        raise FormatError(f"field {k!r} must be an integer 0..999 (AIME answer), got {a!r}")
    out: dict[str, Any] = {"problem": p, "answer": str(int(s)), **_id(row)}
    for extra in ("year", "url"):
        if extra in row:
            out[extra] = row[extra]
    return out


def deepscaler_row(row: dict) -> dict[str, Any]:
    """DeepScaleR-style ``{"problem", "answer", "solution"}``; empty answer -> the solution's last box."""
    _, p = _text(row, ("problem", "question"), "problem")
    a = row.get("answer")
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        a = str(a)
    if not isinstance(a, str) or not a.strip():
        sol = row.get("solution")
        boxed = extract_boxed(sol) if isinstance(sol, str) else None
        if not boxed:
            raise FormatError(f"field 'answer' must be a non-empty string (got {a!r}) or 'solution' must hold a "
                              "\\boxed{...} answer")
        a = boxed
    return {"problem": p, "answer": a.strip(), **_id(row)}


def jsonl_row(row: dict) -> dict[str, Any]:
    return row


ROW_CONVERTERS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "jsonl": jsonl_row, "gsm8k": gsm8k_row, "math": math_row, "aime": aime_row, "deepscaler": deepscaler_row,
}


def convert_row(row: Any, fmt: str) -> dict[str, Any]:
    """One row of ``fmt`` as our record dict; FormatError (naming the field) when it does not fit."""
    if fmt not in ROW_CONVERTERS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {list(ROW_CONVERTERS)}")
    if not isinstance(row, dict):
        raise FormatError(f"expected a JSON object, got {type(row).__name__}")
    return ROW_CONVERTERS[fmt](row)


# ---------------------------------------------------------------------------------------------- CHAMP

_CHAMP_ALT = re.compile(r",?\s*or (?:equivalently|approximately|an equivalent form such as)\s+")
_CHAMP_PHRASES = [  # verbal wrappers around a value; the value is the gold (CHAMP answers are free text)
    re.compile(r"^(?P<v>.+?) is the only possible value$"),
    re.compile(r"^the only possible value for the limit is (?P<v>.+)$", re.I),
    re.compile(r"^the limit exists and is equal to (?P<v>.+)$", re.I),
    re.compile(r"^(?P<v>-?\d+) (?:values|inequalities|roots|pairs|times)$"),
    re.compile(r"^(?P<v>\S+) times$"),
    re.compile(r"^at most (?P<v>\d+) [\w\s-]+$", re.I),  # "At most 0 integer-valued roots"
]


def _balanced(text: str, start: int) -> int:
    """Index of the ``)`` closing the ``(`` at ``start`` (or -1)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _call_to_latex(text: str, name: str, render: Callable[[list[str]], str]) -> str:
    out, i = [], 0
    pat = re.compile(rf"(?<![A-Za-z\\]){name}\(")
    while (m := pat.search(text, i)) is not None:
        close = _balanced(text, m.end() - 1)
        if close < 0:
            break
        args = [a.strip() for a in _split_top(text[m.end():close])]
        out += [text[i:m.start()], render([_plain_to_latex(a) for a in args])]
        i = close + 1
    return "".join(out) + text[i:]


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    return [*parts, "".join(cur)]


def _plain_to_latex(text: str) -> str:
    """CHAMP's plain-text math (``sqrt(3)/3``, ``C(10, 5)``, ``2^(n-1)``, ``floor(n/2)``, ``±``) as LaTeX."""
    t = text.replace("−", "-").replace("≥", "\\geq ").replace("≤", "\\leq ").replace("±", "\\pm ")
    t = _call_to_latex(t, "sqrt", lambda a: f"\\sqrt{{{a[0]}}}")
    t = _call_to_latex(t, "C", lambda a: f"\\binom{{{a[0]}}}{{{a[1]}}}" if len(a) == 2 else f"C({', '.join(a)})")
    t = _call_to_latex(t, "floor", lambda a: f"{{\\lfloor {a[0]} \\rfloor}}")
    t = re.sub(r"(?<![A-Za-z\\])sum_\(([^()]*)\)\^(\w+|\{[^{}]*\})", r"\\sum_{\1}^{\2}", t)
    t = re.sub(r"\^\(([^()]*)\)", r"^{\1}", t)  # 2^(n-1) -> 2^{n-1}
    return t


def _drop_remark(v: str) -> str:
    """Drop a trailing remark in parentheses: "100 (i.e., all values)" -> "100"."""
    if not v.endswith(")"):
        return v
    depth = 0
    for i in range(len(v) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(v[i], 0)
        if depth == 0:
            inner = v[i + 1:-1].strip()
            if i > 0 and re.match(r"(?:i\.e\.|no |none )", inner):
                return v[:i].strip()
            return v
    return v


def champ_gold(answer: str) -> list[str]:
    """CHAMP's free-text gold answer as checkable alternatives (first = primary).

    ``"C(10, 5), or equivalently 252"`` -> ``["\\\\binom{10}{5}", "252"]``; ``"100 (i.e., all values)"`` ->
    ``["100"]``; ``"0 is the only possible value"`` -> ``["0"]``; ``"376 and 625"`` -> ``["376, 625"]``.
    Purely verbal answers ("No", "No integer solutions") stay as written.
    """
    alts = []
    for part in _CHAMP_ALT.split(answer.strip()):
        v = _drop_remark(part.strip())
        for pat in _CHAMP_PHRASES:
            m = pat.match(v)
            if m:
                v = m.group("v").strip()
                break
        if re.fullmatch(r"[-\w\s,.()/^]+ and [-\w\s()/^]+", v) and not re.search(r"[A-Za-z]{3,}", v.replace(" and ", " ")):
            v = re.sub(r",?\s+and\s+", ", ", v)  # "1, 4 and 9" -> "1, 4, 9"; "x=1, y=1 and x=3, y=2" stays
        v = _plain_to_latex(v)
        if v and v not in alts:
            alts.append(v)
    return alts


def champ_records(source: str | Path | None = None) -> list[dict[str, Any]]:
    """The 270 CHAMP problems as our records: id (``P_Combinatorics_1``), problem, answer, category, solution.

    ``source``: None (or "v0") reads the installed ``champ-dataset`` package; a path reads that JSON file.
    ``answer`` is a list when the gold lists alternatives; ``answer_text`` keeps CHAMP's original string.
    """
    try:
        import champ_dataset
    except ImportError:
        raise FormatError("the CHAMP converter needs the champ-dataset package: pip install champ-dataset") from None
    ds = champ_dataset.load(str(source) if source is not None else "v0")
    out = []
    for pid, p in ds.problems.items():
        gold = champ_gold(p.answer)
        if not gold:
            raise FormatError(f"CHAMP problem {pid}: empty answer")
        out.append({
            "id": pid, "problem": p.text, "answer": gold if len(gold) > 1 else gold[0], "answer_text": p.answer,
            "category": p.category, "solution": "\n".join(s.text for s in p.solution.steps),
        })
    return out


# ---------------------------------------------------------------------------------------------- files


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of a JSONL file; blank lines skipped; FormatError names line and column."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None


def convert_file(fmt: str, src: str | Path | None, dst: str | Path) -> int:
    """Convert ``src`` (rows of ``fmt``; for ``champ``: the package or a CHAMP JSON) to our JSONL at ``dst``.

    Rows without an id get ``<file stem>-<line>``. Returns the number of records written; the output is
    written only when every row converted (a bad row raises FormatError naming ``file:line`` and field).
    """
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt == "champ":
        rows = champ_records(src if src not in (None, "", "-") else None)
    else:
        if src is None:
            raise FormatError(f"--format {fmt} needs an input file")
        p = Path(src)
        if not p.is_file():
            raise FormatError(f"{p}: input file not found")
        rows = []
        for lineno, raw in iter_jsonl(p):
            try:
                rec = convert_row(raw, fmt)
            except FormatError as e:
                raise FormatError(f"{p}:{lineno}: {e}") from None
            if fmt != "jsonl":
                rec.setdefault("id", f"{p.stem}-{lineno}")
            rows.append(rec)
        if not rows:
            raise FormatError(f"{p}: no records")
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if "id" in r:
            if str(r["id"]) in seen:
                raise FormatError(f"{src}: duplicate id {r['id']!r} (records {seen[str(r['id'])]} and {i})")
            seen[str(r["id"])] = i
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    """``scpo data convert --format FMT IN OUT`` (``scpo data convert --format champ OUT`` reads the package)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="scpo data", description="dataset tools: convert public formats to "
                                     "our JSONL (problem, answer, id)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("convert", help="convert a public dataset file to our JSONL")
    c.add_argument("--format", required=True, choices=FORMATS, help="input format")
    c.add_argument("paths", nargs="+", metavar="PATH", help="IN OUT (champ: [CHAMP_JSON] OUT)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.paths) not in ((1, 2) if args.format == "champ" else (2,)):
        parser.error("give IN OUT" + (" (or just OUT for champ)" if args.format == "champ" else ""))
    src, dst = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    n = convert_file(args.format, src, dst)  # FormatError/OSError: `scpo` prints one "scpo data: error:" line
    print(f"wrote {n} records to {dst}")
    return 0
