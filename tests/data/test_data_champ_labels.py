"""The answer checker against hand labels on real LLM solutions (CHAMP), recomputed from the installed package.

Labels: tests/data/champ_answer_labels.jsonl (how they were drawn: benchmarks/answer_checker_champ.py).
The floors are the numbers docs/data.md reports; a checker change that lowers them fails here.
"""

import importlib.util
import json
from pathlib import Path

import pytest

LABELS = Path(__file__).with_name("champ_answer_labels.jsonl")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "answer_checker_champ.py"


def _bench():
    spec = importlib.util.spec_from_file_location("answer_checker_champ", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_labels_file_is_well_formed():
    rows = [json.loads(x) for x in LABELS.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(rows) >= 40
    assert {r["stratum"] for r in rows} == {"checker_true", "checker_false_sample"}
    assert len({(r["pid"], r["key"]) for r in rows}) == len(rows)
    for r in rows:
        assert isinstance(r["correct"], bool) and r["weight"] >= 1.0
        wrong_verdict = (r["stratum"] == "checker_true") != r["correct"]
        assert bool(r["kind"]) == wrong_verdict, r  # every labelled checker error says what kind it is


def test_precision_recall_on_champ():
    pytest.importorskip("champ_dataset", reason="champ-dataset is a dev extra (pip install -e '.[dev]')")
    bench = _bench()
    labels = bench.load_labels(LABELS)
    wanted = {(r["pid"], r["key"]) for r in labels}
    sols = [s for s in bench.champ_solutions() if (s["pid"], s["key"]) in wanted]
    assert len(sols) == len(labels)
    res = bench.precision_recall(labels, bench.verdicts(sols))
    assert res["precision"] >= 0.95 and res["recall"] >= 0.56, res
