"""Public dataset formats -> our JSONL: GSM8K, MATH/MATH-500, AIME, DeepScaleR rows (copied from the published
datasets, solutions shortened), CHAMP from the installed package; bad rows give one line naming file:line and field."""

import json

import pytest

from megatron_scpo.cli import main as scpo
from megatron_scpo.data.answers import ALT_SEP, is_correct
from megatron_scpo.data.config import DataConfig
from megatron_scpo.data.datasets import DataError, load_prompts, load_split
from megatron_scpo.data.formats import FormatError, champ_gold, convert_file

# openai/grade-school-math, train.jsonl line 1
GSM8K = [{
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends "
                "in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
              "in April and May.\n#### 72",
}, {
    "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did "
                "she earn?",
    "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
              "$<<0.2*50=10>>10.\n#### 10",
}]
# HuggingFaceH4/MATH-500 (has "answer") and hendrycks/MATH (gold only in the solution's box)
MATH = [{
    "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the "
               "form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
    "solution": "We have that $r = \\sqrt{0^2 + 3^2} = 3.$ ... Therefore, the polar coordinates are "
                "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
    "unique_id": "test/precalculus/807.json",
}, {
    "problem": "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?", "level": "Level 3",
    "type": "Algebra",
    "solution": "The denominator of the rational function factors into $x^2+x-6=(x-2)(x+3)$. Since the numerator is "
                "always nonzero, there is a vertical asymptote whenever the denominator is $0$, which occurs for "
                "$x = 2$ and $x = -3$.  Therefore, the graph has $\\boxed{2}$ vertical asymptotes.",
}]
# AI-MO/aimo-validation-aime and Maxwell-Jia/AIME_2024 layouts
AIME = [{
    "id": 60, "problem": "Every morning Aya goes for a $9$-kilometer-long walk and stops at a coffee shop afterwards. "
    "... Find the number of minutes the walk takes her, including the $t$ minutes spent in the coffee shop.",
    "solution": "...", "answer": "204", "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
}, {"ID": "2024-II-4", "Problem": "Let $x,y$ and $z$ be positive real numbers ... Then the value of "
    "$\\left|\\log_2(x^4y^3z^2)\\right|$ is $\\tfrac{m}{n}$ ... Find $m+n$.", "Solution": "...", "Answer": 33}]
# agentica-org/DeepScaleR-Preview-Dataset: the solution's box is the AMC letter, "answer" is the value
DEEPSCALER = [{
    "problem": "The operation $\\otimes$ is defined for all nonzero numbers by $a \\otimes b = \\frac{a^{2}}{b}$. "
               "Determine $[(1 \\otimes 2) \\otimes 3] - [1 \\otimes (2 \\otimes 3)]$.",
    "answer": "-\\frac{2}{3}",
    "solution": "1. **Apply the operation $\\otimes$ to the innermost parentheses first:** ... "
                "$\\boxed{A}$",
}, {"problem": "Doug constructs a square window using $8$ equal-size panes of glass ... What is the side length of "
    "the square window?", "answer": "", "solution": "... the side length is $\\boxed{26}$ inches."}]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt, rows, answers, ids", [
    ("gsm8k", GSM8K, ["72", "10"], ["in-1", "in-2"]),
    ("math", MATH, ["\\left( 3, \\frac{\\pi}{2} \\right)", "2"], ["test/precalculus/807.json", "in-2"]),
    ("aime", AIME, ["204", "33"], ["60", "2024-II-4"]),
    ("deepscaler", DEEPSCALER, ["-\\frac{2}{3}", "26"], ["in-1", "in-2"]),
])
def test_convert_public_formats(tmp_path, fmt, rows, answers, ids):
    out = tmp_path / "out.jsonl"
    assert scpo(["data", "convert", "--format", fmt, str(_write(tmp_path / "in.jsonl", rows)), str(out)]) == 0
    recs = load_prompts(out)
    assert [r.answer for r in recs] == answers and [r.id for r in recs] == ids
    assert all(r.problem == (row.get("problem") or row.get("question") or row.get("Problem")) for r, row in zip(recs, rows))
    assert all(is_correct(f"so \\boxed{{{a}}}", r.answer) for a, r in zip(answers, recs))
    # the same rows read directly through the data config's format key
    cfg = DataConfig(source="file", train_path=str(tmp_path / "in.jsonl"), format=fmt)
    assert [r.answer for r in load_split(cfg, "train")] == answers


def test_gsm8k_solution_kept_and_math_meta(tmp_path):
    out = tmp_path / "o.jsonl"
    convert_file("gsm8k", _write(tmp_path / "g.jsonl", GSM8K[:1]), out)
    row = json.loads(out.read_text())
    assert row["solution"].endswith("72 clips altogether in April and May.") and "####" not in row["solution"]
    convert_file("math", _write(tmp_path / "m.jsonl", MATH[1:]), out)
    assert json.loads(out.read_text())["level"] == "Level 3"


@pytest.mark.parametrize("fmt, row, message", [
    ("gsm8k", {"question": "q", "answer": "no final line"}, r"bad\.jsonl:2: field 'answer' has no final '#### <answer>'"),
    ("gsm8k", {"answer": "#### 3"}, r"bad\.jsonl:2: missing question field"),
    ("math", {"problem": "p", "solution": "no box here"}, r"bad\.jsonl:2: field 'solution' has no closed \\boxed"),
    ("math", {"problem": "p", "solution": "\\boxed{3"}, r"bad\.jsonl:2: field 'solution' has no closed"),
    ("aime", {"problem": "p", "answer": "12.5"}, r"bad\.jsonl:2: field 'answer' must be an integer 0\.\.999"),
    ("aime", {"Problem": "p", "Answer": 1000}, r"bad\.jsonl:2: field 'Answer' must be an integer 0\.\.999"),
    ("deepscaler", {"problem": "p", "answer": "", "solution": "none"}, r"bad\.jsonl:2: field 'answer' must be"),
    ("deepscaler", {"problem": " ", "answer": "1"}, r"bad\.jsonl:2: field 'problem' must be a non-empty string"),
    ("deepscaler", "[1]", r"bad\.jsonl:2: expected a JSON object"),
    ("deepscaler", '{"problem": "p", ', r"bad\.jsonl:2: malformed JSON"),
])
def test_bad_rows_name_file_line_field(tmp_path, capsys, fmt, row, message):
    good = {"gsm8k": GSM8K, "math": MATH, "aime": AIME, "deepscaler": DEEPSCALER}[fmt][0]
    src = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(FormatError, match=message):
        convert_file(fmt, src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert scpo(["data", "convert", "--format", fmt, str(src), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scpo data: error: ") and "\n" not in err and "bad.jsonl:2" in err
    if not message.endswith("malformed JSON"):  # the loader (data.format) names the same line
        with pytest.raises(DataError, match=message.replace("bad\\.jsonl", "bad\\.jsonl")):
            load_prompts(src, fmt=fmt)


def test_answer_lists_are_alternatives(tmp_path):
    p = _write(tmp_path / "alt.jsonl", [{"problem": "C(10,5)?", "answer": ["\\binom{10}{5}", 252]}])
    rec = load_prompts(p)[0]
    assert rec.answer == f"\\binom{{10}}{{5}}{ALT_SEP}252"
    assert is_correct("\\boxed{252}", rec.answer) and is_correct("\\boxed{\\binom{10}{5}}", rec.answer)
    assert not is_correct("\\boxed{250}", rec.answer)
    with pytest.raises(DataError, match=r"alt2\.jsonl:1: field 'answer' must be a non-empty list"):
        load_prompts(_write(tmp_path / "alt2.jsonl", [{"problem": "p", "answer": ["1", ""]}]))


def test_champ_gold_alternatives():
    assert champ_gold("C(10, 5), or equivalently 252") == ["\\binom{10}{5}", "252"]
    assert champ_gold("5/14, or approximately 35.7%") == ["5/14", "35.7%"]
    assert champ_gold("100 (i.e., all values)") == ["100"]
    assert champ_gold("0 is the only possible value") == ["0"]
    assert champ_gold("The limit exists and is equal to (1+sqrt(4a+1))/2") == ["(1+\\sqrt{4a+1})/2"]
    assert champ_gold("1, 4 and 9") == ["1, 4, 9"] and champ_gold("x=1, y=1 and x=3, y=2") == ["x=1, y=1 and x=3, y=2"]
    assert champ_gold("2^floor(n/2)*floor(n/2)!") == ["2^{\\lfloor n/2 \\rfloor}*{\\lfloor n/2 \\rfloor}!"]
    assert champ_gold("sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2") == ["\\sum_{i=1}^{n} i^3", "(n(n+1)/2)^2"]
    assert champ_gold("No integer solutions") == ["No integer solutions"]


def test_champ_from_package(tmp_path, capsys):
    pytest.importorskip("champ_dataset", reason="champ-dataset is a dev extra (pip install -e '.[dev]')")
    out = tmp_path / "champ.jsonl"
    assert scpo(["data", "convert", "--format", "champ", str(out)]) == 0
    assert "wrote 270 records" in capsys.readouterr().out
    recs = {r.id: r for r in load_prompts(out)}
    assert len(recs) == 270 and recs["P_Combinatorics_1"].answer == "239"
    two = recs["P_Combinatorics_2"]
    assert two.meta["answer_text"] == "C(10, 5), or equivalently 252" and two.meta["category"] == "Combinatorics"
    assert is_correct("\\boxed{252}", two.answer) and is_correct("\\boxed{\\binom{10}{5}}", two.answer)
    assert is_correct("\\boxed{\\frac{\\sqrt{3}}{3}}", recs["P_Inequality_18"].answer)
    assert is_correct("\\boxed{\\text{No}}", recs["P_Combinatorics_17"].answer)
    for r in recs.values():  # every gold alternative, boxed, is judged correct against its own record
        assert all(is_correct(f"\\boxed{{{a}}}", r.answer) for a in r.answer.split(ALT_SEP)), r.id


def test_data_format_key_is_checked():
    from megatron_scpo import configlib

    assert configlib.build(DataConfig, {"format": "aime"}).format == "aime"
    with pytest.raises(configlib.ConfigError, match="format: 'nope' is not allowed"):
        configlib.build(DataConfig, {"format": "nope"})
