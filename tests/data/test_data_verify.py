"""data/verify.py's answer-extraction option (``data.answer_extraction``) on real responses of the real model.

``smollm2_arith_samples.jsonl``: 32 responses of SmolLM2-135M-Instruct (LocalEngine, fp32, T = 0.7, seed 0, 160
new tokens, 2 per prompt) to the first 16 prompts of configs/data/arith1_words_eval.jsonl through its chat template
(the config's rendering, which asks for ``\\boxed{}``). Each finished response was read and labelled by hand
(``hand``: does its final stated answer equal the gold?); ``note`` explains the hard ones. None is boxed, which is
why the default ``boxed`` extraction gives this model no reward. The measured agreement of ``last_number`` with the
hand labels is pinned below (docs/data.md "Models that do not box").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_scpo.data.answers import is_correct
from megatron_scpo.data.verify import Grading, grade

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLES = [json.loads(line) for line in (HERE / "smollm2_arith_samples.jsonl").read_text().splitlines()]
# 1-based lines where the last-number verdict differs from the hand label, and why.
DIFFERS = {20: "false match: the last number is '10 steps', the stated result 12",
           25: "miss: '9 + 2 = 11, which is the final answer.' followed by a sentence with a 2"}


def test_real_smollm2_responses_last_number_vs_hand_labels():
    tp = fp = fn = tn = 0
    for line, row in enumerate(SAMPLES, 1):
        if row["finish_reason"] != "stop":
            continue
        boxed = is_correct(row["response"], row["gold"])
        last = is_correct(row["response"], row["gold"], extraction="last_number")
        assert boxed is False, (line, row["response"])  # nothing boxed: the default grades every one wrong
        assert (last != row["hand"]) == (line in DIFFERS), (line, last, row["hand"], row["response"])
        tp += last and row["hand"]
        fp += last and not row["hand"]
        fn += row["hand"] and not last
        tn += not last and not row["hand"]
    assert (tp, fp, fn, tn) == (9, 1, 1, 10)  # precision 0.9, recall 0.9 on 21 finished responses


def test_truncated_real_responses_stay_wrong():
    """rl.truncated_grading: wrong applies whatever the extraction: a cut ramble's last number is no answer."""
    cut = [r for r in SAMPLES if r["finish_reason"] == "length"]
    assert len(cut) == 11
    for r in cut:
        assert not grade(r["response"], r["gold"], "length", extraction="last_number")
    lenient = sum(grade(r["response"], r["gold"], "length", truncated="grade", extraction="last_number") for r in cut)
    assert lenient == 3  # graded as if finished, 3 of them would end on the gold by accident


def test_grading_reads_data_answer_extraction(monkeypatch):
    from megatron_scpo.config import load_config

    monkeypatch.chdir(REPO)
    assert load_config("configs/tiny_cpu.yaml").data.answer_extraction == "boxed"  # the default: unchanged
    assert Grading.from_config(load_config("configs/tiny_cpu.yaml")).extraction == "boxed"
    cfg = load_config("configs/smollm2_cpu.yaml")
    g = Grading.from_config(cfg)
    assert g.extraction == "last_number"
    assert g.grade("So the answer is 11.", "11", "stop") and not Grading().grade("So the answer is 11.", "11", "stop")
    assert g.grade("\\boxed{11}", "11", "stop") and not g.grade("11", "11", "abort")
    with pytest.raises(Exception, match=r"data.answer_extraction: 'last' is not allowed"):
        load_config("configs/smollm2_cpu.yaml", ["data.answer_extraction=last"])
    with pytest.raises(ValueError, match="answer extraction"):
        grade("11", "11", "abort", extraction="last")  # type: ignore[arg-type]
