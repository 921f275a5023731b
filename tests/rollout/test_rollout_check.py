"""Post-sync check (hand-computed metrics), rollout config section and the engine factory."""

from __future__ import annotations

import math

import pytest
import torch
from rollout_tiny import EOS, tiny_llama, tiny_tokenizer

from megatron_scpo.config import ConfigError, load_config
from megatron_scpo.rollout import (
    LogprobMismatchError,
    RolloutInputError,
    build_engine,
    sampling_params,
)
from megatron_scpo.rollout.check import check_logprobs, make_check_sequences
from megatron_scpo.rollout.local import LocalEngine


class FakeEngine:
    weight_version = 4

    def __init__(self, values):
        self.values = values

    def score(self, sequences, prompt_lens, temperature=1.0):
        return self.values


def test_check_metrics_hand_computed():
    ref = [[-1.0, -2.0], [-0.5]]
    eng = FakeEngine([[-1.1, -2.0], [-0.3]])
    m = check_logprobs(eng, lambda s, p, t: ref, [[1, 2, 3], [1, 2]], [1, 1], tolerance=0.25)
    assert m["rollout_logprob_abs_diff_max"] == pytest.approx(0.2)
    assert m["rollout_logprob_abs_diff_mean"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    with pytest.raises(LogprobMismatchError, match=r"0\.2 > tolerance 0\.15 .*weight version 4"):
        check_logprobs(eng, lambda s, p, t: ref, [[1, 2, 3], [1, 2]], [1, 1], tolerance=0.15)
    with pytest.raises(LogprobMismatchError, match="non-finite"):
        check_logprobs(FakeEngine([[math.nan, -2.0], [-0.5]]), lambda s, p, t: ref, [], [], tolerance=1.0)
    with pytest.raises(LogprobMismatchError, match="sequence 1: engine gave 2 log-probs, trainer 1"):
        check_logprobs(FakeEngine([[-1.0, -2.0], [-0.5, -1.0]]), lambda s, p, t: ref, [], [], tolerance=1.0)


def test_check_sequences_are_fixed_and_avoid_ids():
    a, pa = make_check_sequences(300, num=3, seq_len=16, avoid_ids=(0, 1, 2))
    b, _ = make_check_sequences(300, num=3, seq_len=16, avoid_ids=(0, 1, 2))
    assert a == b and pa == [8, 8, 8] and all(len(s) == 16 and min(s) > 2 for s in a)


def test_local_engine_check_and_score_validation():
    model = tiny_llama(seed=0)
    eng = LocalEngine(model, eos_token_ids=[EOS])
    seqs, pls = make_check_sequences(300, num=2, seq_len=12)
    trainer = LocalEngine(tiny_llama(seed=0)).score  # a separate copy of the same weights
    m = check_logprobs(eng, trainer, seqs, pls, tolerance=1e-5, temperature=0.7)
    assert m["rollout_logprob_abs_diff_max"] < 1e-5
    with pytest.raises(LogprobMismatchError):
        check_logprobs(eng, LocalEngine(tiny_llama(seed=1)).score, seqs, pls, tolerance=1e-3)
    with pytest.raises(RolloutInputError, match=r"prompt_lens\[0\]"):
        eng.score([[1, 2]], [2])
    with pytest.raises(RolloutInputError, match="temperature"):
        eng.score([[1, 2]], [1], 0.0)


def test_rollout_config_section_and_factory(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "rollout:\n  temperature: 0.6\n  top_k: 20\n  stop: ['</answer>']\n  stop_token_ids: [7, 1]\n"
        "  max_new_tokens: 7\n  sglang:\n    weight_sync: distributed\n    tp_size: 2\n"
    )
    cfg = load_config(p)
    assert cfg.rollout.sglang.weight_sync == "distributed" and cfg.rollout.sglang.tp_size == 2
    sp = sampling_params(cfg.rollout, temperature=0.9, seed=5, eos_id=EOS)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.stop, sp.seed, sp.max_new_tokens) == (0.9, 1.0, 20, ["</answer>"], 5, 7)
    assert sp.stop_token_ids == sorted({1, 7, EOS}) and not sp.greedy
    with pytest.raises(RolloutInputError, match="SamplingParams.seed"):
        sampling_params(cfg.rollout, temperature=0.9, seed=-1, eos_id=EOS)
    # the sampling seed is rl.seed's (per step): a rollout.seed key would do nothing, so it is refused
    with pytest.raises(ConfigError, match="unknown key rollout.seed"):
        load_config(None, ["rollout.seed=3"])
    with pytest.raises(ConfigError, match="rollout.sglang.weight_sync"):
        load_config(None, ["rollout.sglang.weight_sync=nccl"])
    with pytest.raises(ConfigError, match="rollout.sglang"):
        load_config(None, ["rollout.sglang.max_retries=-1"])
    with pytest.raises(ConfigError, match="rollout"):
        load_config(None, ["rollout.top_k=0"])
    hf_dir = tmp_path / "m"
    tiny_llama(seed=0).save_pretrained(hf_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(hf_dir)
    eng = build_engine(load_config(None, ["rollout.local_max_batch_size=3"]).rollout, hf_dir, tok)
    assert isinstance(eng, LocalEngine) and eng.max_batch_size == 3 and eng.tokenizer is tok
    ref = tiny_llama(seed=0)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in eng.model.state_dict().items())
