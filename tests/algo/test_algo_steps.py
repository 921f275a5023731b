"""Step segmentation (char-level hand-worked example, a real BPE tokenizer's offsets) and importance."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron_scpo.algo.config import ImportanceConfig, SegmentationConfig
from megatron_scpo.algo.importance import (
    ImportanceItem,
    build_importance_requests,
    estimate_importance,
    importance_from_scores,
)
from megatron_scpo.algo.steps import segment_steps, stack_step_ids, step_lengths, step_lengths_batch

TEXT = "<think>ab\n\ncdefgh\n\nxy\n\nijklmn</think>ok"


def chars(text):
    return [(i, i + 1) for i in range(len(text))]


def test_segment_hand_worked():
    # intervals: "<think>ab\n\n" 11 | "cdefgh\n\n" 8 | "xy\n\n" 4 | "ijklmn" 6 | "</think>ok" 10 (answer)
    seg = segment_steps(TEXT, chars(TEXT), SegmentationConfig(min_step_tokens=5))
    assert seg.step_ids.tolist() == [0] * 11 + [1] * 12 + [2] * 6 + [3] * 10
    assert seg.num_steps == 4 and seg.answer_step == 3
    seg1 = segment_steps(TEXT, chars(TEXT), SegmentationConfig(min_step_tokens=1))
    assert seg1.step_ids.tolist() == [0] * 11 + [1] * 8 + [2] * 4 + [3] * 6 + [4] * 10
    # an empty-span token (EOS offset (0, 0)) inherits the previous step
    seg2 = segment_steps(TEXT, chars(TEXT) + [(0, 0)], SegmentationConfig(min_step_tokens=5))
    assert seg2.step_ids[-1] == 3 and seg2.step_ids.numel() == len(TEXT) + 1
    # a short first step absorbs the next one; the answer step never merges
    t = "a\n\nbcdefg\n\nhijklm</think>x"
    s = segment_steps(t, chars(t), SegmentationConfig(min_step_tokens=4))
    assert s.step_ids.tolist() == [0] * 11 + [1] * 6 + [2] * 9 and s.answer_step == 2


def test_segment_boxed_without_think_and_edge_cases():
    t = "Let x\n\nso y\n\nThus \\boxed{4}"
    s = segment_steps(t, chars(t), SegmentationConfig(min_step_tokens=1))
    assert s.step_ids.tolist() == [0] * 7 + [1] * 6 + [2] * (len(t) - 13) and s.answer_step == 2
    assert segment_steps("", []).num_steps == 0
    s = segment_steps("no delimiters here", chars("no delimiters here"))
    assert s.num_steps == 1 and s.answer_step is None
    with pytest.raises(ValueError, match="token 1"):
        segment_steps("ab", [(0, 1), (1, 5)])
    with pytest.raises(ValueError, match="regex"):
        SegmentationConfig(delimiter="(").validate()


def test_segment_with_bpe_offsets_matches_char_level():
    corpus = [TEXT, "The sum 7 + 5 = 12.\n\nWait, check 7 + 5 = 12.\n\nSo \\boxed{12}", "<think>a b c</think>"] * 5
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    text = "<think>The sum 7 + 5 = 12.\n\nWait, check 7 + 5 = 12.\n\nok</think>So \\boxed{12}"
    enc = tok.encode(text)
    cfg = SegmentationConfig(min_step_tokens=1)
    seg = segment_steps(text, enc.offsets, cfg)
    ref = segment_steps(text, chars(text), cfg).step_ids
    assert seg.step_ids.numel() == len(enc.ids)
    for (s, e), sid in zip(enc.offsets, seg.step_ids.tolist()):
        if e > s:
            assert sid == ref[s].item()
    assert seg.num_steps == 4 and seg.answer_step == 3


def test_step_lengths_helpers():
    ids = stack_step_ids([torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1, 2])], 6, offsets=[1, 0])
    assert ids.tolist() == [[-1, 0, 0, 1, -1, -1], [0, 1, 1, 2, -1, -1]]
    lengths, num = step_lengths_batch(ids)
    assert lengths.tolist() == [[2, 1, 0], [1, 2, 1]] and num.tolist() == [2, 3]
    assert step_lengths(ids[1]).tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="zero-length"):
        step_lengths_batch(torch.tensor([[0, 0, 2]]))
    with pytest.raises(ValueError, match="fit"):
        stack_step_ids([torch.tensor([0, 0, 1])], 2)


# ---- importance ----------------------------------------------------------------------------------

WEIGHTS = {10: 2.0, 20: 0.5, 30: 1.0}


def additive_scorer(seqs, positions):
    """log p(answer) = -5 + sum of weights of marker tokens present (so each step's gain is its weight)."""
    for s, p in zip(seqs, positions):
        assert [s[i] for i in p] == [8, 9]
    return [-5.0 + sum(w for t, w in WEIGHTS.items() if t in s) for s in seqs]


def item():
    resp = [10, 11, 20, 30, 31, 32, 99]
    steps = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    return ImportanceItem(prompt_ids=[1, 2], response_ids=resp, step_ids=steps, answer_ids=[8, 9], answer_step=3)


def test_importance_requests_exact_sequences():
    req = build_importance_requests([item()], [7], ImportanceConfig(mode="prefix_gain"))
    assert req.sequences == [[1, 2, 7, 8, 9], [1, 2, 10, 11, 7, 8, 9], [1, 2, 10, 11, 20, 7, 8, 9],
                             [1, 2, 10, 11, 20, 30, 31, 32, 7, 8, 9]]
    assert req.answer_positions[1] == [5, 6]
    req = build_importance_requests([item()], [7], ImportanceConfig(mode="leave_one_out", max_scored_steps=2))
    # units: steps {0, 1} and {2}
    assert req.sequences == [[1, 2, 10, 11, 20, 30, 31, 32, 7, 8, 9], [1, 2, 30, 31, 32, 7, 8, 9],
                             [1, 2, 10, 11, 20, 7, 8, 9]]


@pytest.mark.parametrize("mode", ["prefix_gain", "leave_one_out"])
def test_importance_hand_computed(mode):
    cfg = ImportanceConfig(mode=mode)
    (w,) = estimate_importance([item()], [7], additive_scorer, cfg)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 1 / 3, 1.0]))  # gains 2, 0.5, 1 -> min-max; answer 1
    cfg.max_scored_steps = 2
    (w,) = estimate_importance([item()], [7], additive_scorer, cfg)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.0, 1.0]))  # units {0,1}: 2.5, {2}: 1
    cfg = ImportanceConfig(mode=mode, normalize="softmax", temperature=0.5)
    (w,) = estimate_importance([item()], [7], additive_scorer, cfg)
    e = [math.exp(g / 0.5) for g in (2.0, 0.5, 1.0)]
    torch.testing.assert_close(w[:3], torch.tensor([x / sum(e) for x in e]))


def test_importance_edge_cases():
    # no reasoning step (answer only) and a single step: no scoring needed / all-equal -> 1
    only_answer = ImportanceItem([1], [99], torch.tensor([0]), [8], answer_step=0)
    one_step = ImportanceItem([1], [10, 99], torch.tensor([0, 1]), [8], answer_step=1)
    req = build_importance_requests([only_answer, one_step], [7])
    assert len(req.sequences) == 2
    ws = importance_from_scores([-3.0, -1.0], req)
    assert ws[0].tolist() == [1.0] and ws[1].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="non-finite"):
        importance_from_scores([float("nan"), -1.0], req)
    with pytest.raises(ValueError, match="scores"):
        importance_from_scores([-1.0], req)
    with pytest.raises(ValueError, match="answer_ids"):
        build_importance_requests([ImportanceItem([1], [10], torch.tensor([0]), [])], [7])
    with pytest.raises(ValueError, match="non-decreasing"):
        build_importance_requests([ImportanceItem([1], [10, 11, 12], torch.tensor([1, 0, 2]), [8], answer_step=2)], [7])


def test_default_delimiter_keeps_a_colon_lead_in_with_its_equation():
    # CHAMP-style solution: "...as:\n\n$$...$$" is one step under the default, two under a plain "\n\n"
    text = "<think>We can write this as:\n\n$$x^2 - 1 = 0$$\n\nSo x is 1 or -1.\n\n</think>\\boxed{1}"
    seg = segment_steps(text, chars(text), SegmentationConfig(min_step_tokens=1))
    plain = segment_steps(text, chars(text), SegmentationConfig(min_step_tokens=1, delimiter=r"\n\n"))
    assert seg.num_steps == 3 and plain.num_steps == 4  # (lead-in + equation), conclusion, answer
    first = text.index("$$x^2")
    assert seg.step_ids[first] == seg.step_ids[0] and plain.step_ids[first] != plain.step_ids[0]
