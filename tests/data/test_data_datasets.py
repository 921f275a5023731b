"""Dataset files (good and bad), the synthetic records, the resumable iterator, templates, the config section."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_scpo import configlib
from megatron_scpo.data import templates
from megatron_scpo.data.config import DataConfig, SyntheticConfig
from megatron_scpo.data.datasets import (
    DataError,
    PromptIterator,
    PromptRecord,
    encode_prompts,
    load_prompts,
    load_split,
    synthetic_records,
)


def _jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_field_aliases_and_explicit_names(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [
        {"question": "1 + 1", "solution": "so \\boxed{2}", "level": 3},
        "",
        {"question": "2 + 2", "solution": 4, "uid": "x"},
    ])
    recs = load_prompts(p)
    assert recs[0] == PromptRecord("0", "1 + 1", "so \\boxed{2}", {"level": 3})
    assert recs[1] == PromptRecord("x", "2 + 2", "4", {})
    p2 = _jsonl(tmp_path / "b.jsonl", [{"q": "a", "gt": "1", "answer": "ignored", "k": "k1"}])
    rec = load_prompts(p2, problem_key="q", answer_key="gt", id_key="k")[0]
    assert (rec.id, rec.problem, rec.answer, rec.meta) == ("k1", "a", "1", {"answer": "ignored"})


@pytest.mark.parametrize(
    "lines, kwargs, message",
    [
        ([{"problem": "a", "answer": "1"}, "", '{"problem": "b", "answer": '], {}, r"bad\.jsonl:3: malformed JSON"),
        ([{"problem": "a", "answer": "1"}, {"problem": "b"}], {}, r"bad\.jsonl:2: missing answer field"),
        ([{"problem": "a", "answer": "1"}], {"answer_key": "gold"}, r"bad\.jsonl:1: missing answer field 'gold'"),
        ([{"problem": "", "answer": "1"}], {}, r"bad\.jsonl:1: field 'problem' must be a non-empty string"),
        ([{"problem": "a", "answer": None}], {}, r"bad\.jsonl:1: field 'answer'"),
        (["[1, 2]"], {}, r"bad\.jsonl:1: expected a JSON object"),
        ([{"problem": "a", "answer": "1", "id": 1}, {"problem": "b", "answer": "2", "id": 1}], {}, "duplicate id '1'"),
        ([""], {}, "no records"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, kwargs, message):
    p = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_prompts(p, **kwargs)


def test_parquet_and_other_errors(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "answer": ["1", "2"], "difficulty": [1, 2]}), p)
    recs = load_prompts(p)
    assert [(r.id, r.problem, r.answer, r.meta) for r in recs] == [
        ("0", "p0", "1", {"difficulty": 1}), ("1", "p1", "2", {"difficulty": 2})]
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "answer": ["1", None]}), p)
    with pytest.raises(DataError, match=r"d\.parquet: row 1: field 'answer'"):
        load_prompts(p)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported dataset format"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read parquet"):
        load_prompts(tmp_path / "junk.parquet")


def test_synthetic_records_and_load_split(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(n_train=30, n_eval=10, min_ops=2, max_ops=3, seed=4))
    train, evals = load_split(cfg, "train"), load_split(cfg, "eval")
    assert len(train) == 30 and len(evals) == 10
    assert {r.meta["difficulty"] for r in train} == {2, 3}
    assert not {r.problem for r in train} & {r.problem for r in evals}
    r = train[0]
    assert r.meta["verbose"].endswith(f"\\boxed{{{r.answer}}}") and eval(r.problem) == int(r.answer)
    assert synthetic_records(cfg.synthetic, "train") == train
    file_cfg = DataConfig(source="file", train_path=str(_jsonl(tmp_path / "t.jsonl", [{"problem": "a", "answer": 1}])))
    assert load_split(file_cfg, "train")[0].answer == "1"
    with pytest.raises(DataError, match="eval_path"):
        load_split(file_cfg, "eval")


def test_encode_prompts_rejects_overlong():
    class CharTok:  # one token per character: lengths are easy to count by hand
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    recs = [PromptRecord("a", "1 + 2", "3"), PromptRecord("long", "1 + 2 + 3 + 4", "10")]
    n0 = len("Problem: 1 + 2\nAnswer: <think>")
    assert encode_prompts(recs[:1], CharTok(), "synthetic", n0) == [[ord(c) for c in "Problem: 1 + 2\nAnswer: <think>"]]
    with pytest.raises(DataError, match=r"prompt 'long' has 38 tokens > data.max_prompt_tokens=37"):
        encode_prompts(recs, CharTok(), "synthetic", n0 + 7)


def _records(n):
    return [PromptRecord(str(i), f"p{i}", str(i)) for i in range(n)]


def test_iterator_epochs_and_resume():
    recs = _records(7)
    it = PromptIterator(recs, seed=11)
    first = [r.id for r in it.next_batch(21)]
    for e in range(3):  # each epoch is a permutation, and epochs differ
        assert sorted(first[7 * e:7 * e + 7], key=int) == [str(i) for i in range(7)]
    assert first[:7] != first[7:14] or first[7:14] != first[14:]
    assert first[:7] != [str(i) for i in range(7)]
    # Resume mid-epoch equals an uninterrupted run, also across the following epoch boundary.
    ref = PromptIterator(recs, seed=11)
    ref.next_batch(10)
    state = ref.state_dict()
    assert state == {"epoch": 1, "index": 3, "seed": 11, "size": 7}
    expected = [r.id for r in ref.next_batch(12)]
    resumed = PromptIterator(recs, seed=999)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [r.id for r in resumed.next_batch(12)] == expected
    assert [r.id for r in PromptIterator(recs, seed=11).next_batch(22)][10:] == expected
    assert [r.id for r in PromptIterator(recs, seed=12).next_batch(7)] != first[:7]
    assert [r.id for r in PromptIterator(recs, shuffle=False).next_batch(8)] == [str(i) for i in range(7)] + ["0"]
    with pytest.raises(ValueError, match="7 records"):
        PromptIterator(_records(8)).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        PromptIterator(recs).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError):
        PromptIterator([])


def test_templates():
    raw = templates.render_prompt("(1 + 2) * 3", "raw_think")
    assert raw.startswith("You are a helpful assistant.") and raw.endswith("Assistant: <think>")
    assert "User: (1 + 2) * 3 Please think step by step and output the final answer within \\boxed{}." in raw
    assert templates.render_prompt("1 + 2", "synthetic", length_budget=37) == (
        "Problem: 1 + 2\nAnswer: <think> I will answer the question with 37 tokens.")
    assert templates.render_prompt("q", "synthetic", length_budget=5, budget_template=" [{n}]").endswith("<think> [5]")
    with pytest.raises(ValueError, match="chat_template"):
        templates.render_prompt("q", "chat")
    with pytest.raises(ValueError, match="unknown template"):
        templates.render_prompt("q", "nope")
    with pytest.raises(ValueError, match="{n}"):
        templates.render_prompt("q", "synthetic", length_budget=5, budget_template="x")


def test_config_section_errors():
    cfg = configlib.build(DataConfig, {"synthetic": {"n_train": 5, "max_ops": 6}, "template": "synthetic"})
    assert cfg.synthetic.n_train == 5 and cfg.synthetic.max_ops == 6 and cfg.template == "synthetic"
    with pytest.raises(configlib.ConfigError, match=r"synthetic.*min_ops"):
        configlib.build(DataConfig, {"synthetic": {"min_ops": 3, "max_ops": 2}})
    with pytest.raises(configlib.ConfigError, match=r"unknown key synthetic\.n_trian"):
        configlib.build(DataConfig, {"synthetic": {"n_trian": 3}})
    with pytest.raises(configlib.ConfigError, match="train_path"):
        configlib.build(DataConfig, {"source": "file"})
