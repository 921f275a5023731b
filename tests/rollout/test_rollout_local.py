"""LocalEngine against direct transformers computations on a tiny random Llama (fp32)."""

from __future__ import annotations

import pytest
import torch
from rollout_tiny import EOS, VOCAB, tiny_llama, tiny_tokenizer

from megatron_scpo.rollout import RolloutEngine, RolloutInputError, SamplingParams, WeightSyncError
from megatron_scpo.rollout.local import LocalEngine, filter_logits

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def reference_logprobs(model, seq: list[int], prompt_len: int, temperature: float) -> list[float]:
    """Unpadded single-sequence full forward: the trainer-side recomputation."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return [logp[i - 1, seq[i]].item() for i in range(prompt_len, len(seq))]


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Direct transformers greedy decode (no EOS stop: eos_token_id=None), one prompt at a time."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=24, temperature=1.3, top_k=50, seed=2),
        SamplingParams(max_new_tokens=16, temperature=0.0),  # greedy: log-probs under T = 1
    ],
)
def test_sampled_logprobs_equal_teacher_forced_recompute(model, params):
    eng = LocalEngine(model, eos_token_ids=[EOS], max_batch_size=5)  # 12 rows -> 3 chunks with padding
    out = eng.generate(PROMPTS, 3, params)
    assert [len(g) for g in out] == [3] * len(PROMPTS)
    worst = 0.0
    for p, group in zip(PROMPTS, out):
        for s in group:
            assert s.prompt_ids == p and len(s.token_ids) == len(s.logprobs) >= 1
            ref = reference_logprobs(model, p + s.token_ids, len(p), params.logprob_temperature)
            worst = max(worst, max(abs(a - b) for a, b in zip(s.logprobs, ref)))
            if s.finish_reason == "length":
                assert len(s.token_ids) == params.max_new_tokens
            else:
                assert s.finish_reason == "stop" and s.token_ids[-1] == EOS and s.matched_stop == EOS
    assert worst < 1e-5
    # score() is the same teacher-forced computation, batched with right padding
    seqs = [s.prompt_ids + s.token_ids for g in out for s in g]
    scored = eng.score(seqs, [len(s.prompt_ids) for g in out for s in g], params.logprob_temperature)
    flat = [s.logprobs for g in out for s in g]
    assert max(abs(a - b) for x, y in zip(scored, flat) for a, b in zip(x, y)) < 1e-5


def test_greedy_matches_transformers_and_follows_weight_updates(model):
    eng = LocalEngine(tiny_llama(seed=0), eos_token_ids=[])
    assert isinstance(eng, RolloutEngine)
    greedy = SamplingParams(max_new_tokens=12, greedy=True, temperature=1.0)
    before = [g[0].token_ids for g in eng.generate(PROMPTS, 1, greedy)]
    assert before == [hf_greedy(model, p, 12) for p in PROMPTS]
    assert all(g[0].weight_version == 0 for g in eng.generate(PROMPTS[:1], 1, greedy))

    new = tiny_llama(seed=7)
    eng.update_weights(((k, v.clone()) for k, v in new.state_dict().items()), version=3)
    after = eng.generate(PROMPTS, 2, greedy)
    expected = [hf_greedy(new, p, 12) for p in PROMPTS]
    assert [g[0].token_ids for g in after] == expected and [g[1].token_ids for g in after] == expected
    assert expected != before
    assert eng.weight_version == 3 and all(s.weight_version == 3 for g in after for s in g)


def test_seeds_batching_and_n(model):
    eng = LocalEngine(model, eos_token_ids=[])
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=123)
    a, b = eng.generate(PROMPTS, 4, p), eng.generate(PROMPTS, 4, p)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    c = eng.generate(PROMPTS, 4, SamplingParams(max_new_tokens=10, temperature=1.0, seed=124))
    assert [[s.token_ids for s in g] for g in a] != [[s.token_ids for s in g] for g in c]
    assert all(len({tuple(s.token_ids) for s in g}) > 1 for g in a)  # n samples differ
    # greedy in a padded batch == greedy alone, and independent of the chunk size
    g = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = [x[0].token_ids for x in LocalEngine(model, eos_token_ids=[], max_batch_size=3).generate(PROMPTS, 1, g)]
    alone = [eng.generate([q], 1, g)[0][0].token_ids for q in PROMPTS]
    assert batched == alone
    # top_k=1 and a tiny top_p are greedy
    for q in (SamplingParams(max_new_tokens=10, top_k=1, seed=5), SamplingParams(max_new_tokens=10, top_p=1e-6, seed=5)):
        assert [x[0].token_ids for x in eng.generate(PROMPTS, 1, q)] == batched


def test_filter_logits_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    # top_p 0.7: mass before each token 0, .5, .8, .95 -> keep the first two
    assert torch.isinf(filter_logits(logits, -1, 0.7)).tolist() == [[False, False, True, True]]
    # top_p 0.8 keeps the third too only if mass before it (0.8) <= 0.8
    assert torch.isinf(filter_logits(logits, -1, 0.85)).tolist() == [[False, False, False, True]]
    assert filter_logits(logits, 1, 1.0)[0, 1:].tolist() == [inf, inf, inf]


def test_stop_token_ids_and_stop_strings():
    tok = tiny_tokenizer()
    model = tiny_llama(seed=3)
    eng = LocalEngine(model, tok, eos_token_ids=[])
    g = SamplingParams(max_new_tokens=30, temperature=0.0)
    full = eng.generate(PROMPTS, 1, g)
    base = full[0][0]
    assert base.text == tok.decode(base.token_ids, skip_special_tokens=True) and base.finish_reason == "length"
    # stop id = the 6th generated token: output ends right after its first occurrence
    sid = base.token_ids[5]
    cut = base.token_ids.index(sid) + 1
    s = eng.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[sid]))[0][0]
    assert s.token_ids == base.token_ids[:cut] and s.finish_reason == "stop" and s.matched_stop == sid
    # stop string taken from the middle of the greedy text: text is trimmed before it (SGLang semantics)
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    assert stop.strip() and stop in base.text
    s = eng.generate(PROMPTS[:1], 1, SamplingParams(max_new_tokens=30, temperature=0.0, stop=[stop]))[0][0]
    assert s.finish_reason == "stop" and s.matched_stop == stop
    assert s.text == base.text[: base.text.index(stop)]
    assert s.token_ids == base.token_ids[: len(s.token_ids)] and stop in tok.decode(s.token_ids)
    assert stop not in tok.decode(s.token_ids[:-1])  # stopped at the first token that completes it


@pytest.mark.parametrize(
    "prompts,n,params,match",
    [
        ([], 1, SamplingParams(max_new_tokens=8), "non-empty list"),
        ([[1, 2], []], 1, SamplingParams(max_new_tokens=8), r"prompts\[1\]"),
        ([[1, VOCAB]], 1, SamplingParams(max_new_tokens=8), r"prompts\[0\]: token id out of range"),
        ([[1] * 100], 1, SamplingParams(max_new_tokens=29), r"prompts\[0\]: 100 prompt tokens \+ max_new_tokens 29"),
        ([[1]], 0, SamplingParams(max_new_tokens=8), "n: need an int >= 1"),
        ([[1]], 1, SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, temperature=-1.0), "temperature"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, temperature=float("nan")), "temperature"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, top_p=0.0), "top_p"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, top_k=0), "top_k"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, stop=[""]), "stop"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, stop_token_ids=[-1]), "stop_token_ids"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, seed=-3), "seed"),
        ([[1]], 1, SamplingParams(max_new_tokens=8, stop=["x"]), "need a tokenizer"),
    ],
)
def test_bad_input_is_rejected(model, prompts, n, params, match):
    with pytest.raises(RolloutInputError, match=match):
        LocalEngine(model).generate(prompts, n, params)


def test_update_weights_errors_and_tied_embeddings():
    tied = tiny_llama(seed=1, tie=True)
    eng = LocalEngine(tied, eos_token_ids=[])
    src = {k: v.clone() for k, v in tiny_llama(seed=2, tie=True).state_dict().items()}
    assert "lm_head.weight" in src and torch.equal(src["lm_head.weight"], src["model.embed_tokens.weight"])
    before = {k: v.clone() for k, v in tied.state_dict().items()}

    def expect(named, match):
        with pytest.raises(WeightSyncError, match=match):
            eng.update_weights(named, version=1)
        assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items()), "failed update changed weights"

    expect(list(src.items()) + [("model.bogus", torch.zeros(1))], "unknown tensor name 'model.bogus'")
    expect([(k, v if k != "model.norm.weight" else torch.zeros(3)) for k, v in src.items()], "model.norm.weight")
    expect([(k, v) for k, v in src.items() if k != "model.layers.0.mlp.up_proj.weight"], "missing")
    expect([(k, v if k != "lm_head.weight" else v + 1) for k, v in src.items()], "tied tensors")
    expect([(k, v if k != "model.norm.weight" else v * float("nan")) for k, v in src.items()], "NaN")
    with pytest.raises(WeightSyncError, match="version"):
        eng.update_weights(src.items(), version=-1)
    # tied model: the embedding alone is enough (lm_head shares its storage)
    eng.update_weights([(k, v) for k, v in src.items() if k != "lm_head.weight"], version=1)
    assert torch.equal(tied.lm_head.weight, src["model.embed_tokens.weight"]) and eng.weight_version == 1


def test_pause_resume_shutdown(model):
    eng = LocalEngine(model)
    eng.pause()
    with pytest.raises(RuntimeError, match="paused"):
        eng.generate([[1]], 1, SamplingParams(max_new_tokens=2))
    eng.resume()
    assert eng.generate([[1]], 1, SamplingParams(max_new_tokens=2))[0][0].finish_reason in ("stop", "length")
    assert eng.health()
    eng.shutdown()
    assert not eng.health()
