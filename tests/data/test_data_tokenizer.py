"""Locally built tokenizer (round trip, offsets, whole tokens, v5 AutoTokenizer reload) and the tiny model."""

import re

import pytest
import torch

from megatron_scpo.data import synthetic, templates
from megatron_scpo.data.tiny_model import init_tiny_model, tiny_llama_config
from megatron_scpo.data.tokenizer import build_tokenizer, fingerprint


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "t")


@pytest.fixture(scope="module")
def texts():
    exs = synthetic.generate_examples(40, "eval", seed=1)
    return [templates.render_prompt(e.problem.expression, "synthetic") + e.verbose.text for e in exs]


def test_vocab_and_whole_tokens(tok, texts):
    assert 200 <= len(tok) <= 500
    ids = lambda s: tok(s)["input_ids"]  # noqa: E731
    for d in "0123456789":
        assert len(ids(d)) == 1
    assert ids("1234") == [ids(d)[0] for d in "1234"]  # digits never merge: numbers are spelled digit by digit
    for special in ["\n\n", "<think>", "</think>", "\\boxed{", tok.eos_token, tok.pad_token, tok.bos_token]:
        assert len(ids(special)) == 1, special
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    words = {w for t in texts for w in re.findall(r" [A-Za-z]+", t)}
    assert len(words) > 30
    assert [w for w in words if len(ids(w)) != 1] == []
    # The task markers survive skip_special_tokens (they are content, not control tokens).
    s = "<think>\n1 + 2 = 3\n</think>\n\\boxed{3}"
    assert tok.decode(ids(s) + [tok.eos_token_id], skip_special_tokens=True) == s


def test_round_trip_and_offsets(tok, texts):
    for t in texts + ["héllo wörld ∑ 😀\t\r\n x", "  two  spaces \n\n\n three"]:
        enc = tok(t, return_offsets_mapping=True)
        assert tok.decode(enc["input_ids"]) == t
        if t.isascii():
            assert "".join(t[s:e] for s, e in enc["offset_mapping"]) == t
            assert all(e > s for s, e in enc["offset_mapping"])
    t = texts[0]
    enc = tok(t, return_offsets_mapping=True)
    i = enc["input_ids"].index(tok.convert_tokens_to_ids("</think>"))
    assert enc["offset_mapping"][i] == (t.index("</think>"), t.index("</think>") + len("</think>"))
    # Prompt and completion tokenized separately concatenate to the joint tokenization (rollouts rely on it).
    ex = synthetic.generate_examples(5, "train", seed=2)
    for e in ex:
        p = templates.render_prompt(e.problem.expression, "synthetic")
        assert tok(p)["input_ids"] + tok(e.verbose.text)["input_ids"] == tok(p + e.verbose.text)["input_ids"]


def test_cache_and_chat_template(tok, tmp_path):
    again = build_tokenizer(tmp_path / "fresh")
    assert fingerprint(again) == fingerprint(tok)  # training is deterministic
    assert build_tokenizer(tmp_path / "fresh").get_vocab() == again.get_vocab()  # second call loads the cache
    text = templates.render_prompt("1 + 2", "chat", tok)
    assert text == (
        "<|im_start|>user\n1 + 2 Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n<think>"
    )


def test_tiny_model_dir_reloads_identically(tok, tmp_path, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = init_tiny_model(tmp_path / "m", seed=3, tokenizer=tok, num_hidden_layers=2)
    auto = AutoTokenizer.from_pretrained(d)  # next to a Llama config.json (infra.md C pitfall)
    probe = texts[:5] + ["héllo  wörld\n\n\n 12345 <|im_end|>", "Wait, 7+5=12?!"]
    for t in probe:
        assert auto(t)["input_ids"] == tok(t)["input_ids"]
    assert auto.eos_token_id == tok.eos_token_id and auto.pad_token_id == tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert model.config.head_dim == 64 and model.config.num_key_value_heads == 1
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    # Deterministic in the seed, and the global RNG is left alone.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    d2 = init_tiny_model(tmp_path / "m2", seed=3, tokenizer=tok, num_hidden_layers=2)
    assert torch.equal(torch.rand(1), before)
    d3 = init_tiny_model(tmp_path / "m3", seed=4, tokenizer=tok, num_hidden_layers=2)
    sd = model.state_dict()
    sd2 = AutoModelForCausalLM.from_pretrained(d2).state_dict()
    sd3 = AutoModelForCausalLM.from_pretrained(d3).state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(sd["model.embed_tokens.weight"], sd3["model.embed_tokens.weight"])


def test_tiny_config_overrides_and_errors():
    c = tiny_llama_config(300, hidden_size=256, num_attention_heads=4)
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (300, 256, 4, 256)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_llama_config(300, num_attention_heads=4)


def test_reload_next_to_qwen2_config_keeps_ids(tok, tmp_path, texts):
    """transformers v5 swaps in Qwen2Tokenizer here (infra.md C); our Qwen2-style pre-tokenizer keeps ids equal."""
    from transformers import AutoTokenizer, Qwen2Config

    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for t in texts[:5] + ["héllo  wörld\n\n\n 12345 <|im_end|>", "Wait, 7+5=12?!"]:
        assert auto(t)["input_ids"] == tok(t)["input_ids"]
