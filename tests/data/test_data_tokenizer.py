"""Locally built tokenizer (round trip, offsets, whole tokens, v5 AutoTokenizer reload), the tiny model, and the one
prompt encoding (data/templates.py) against ``apply_chat_template(tokenize=True)`` for tokenizers that do and do not
add BOS, with chat templates that do and do not start with ``bos_token`` (all built here, no downloads)."""

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
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
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
        enc = tok(t, return_offsets_mapping=True, add_special_tokens=False)
        assert tok.decode(enc["input_ids"]) == t
        if t.isascii():
            assert "".join(t[s:e] for s, e in enc["offset_mapping"]) == t
            assert all(e > s for s, e in enc["offset_mapping"])
    t = texts[0]
    enc = tok(t, return_offsets_mapping=True, add_special_tokens=False)
    i = enc["input_ids"].index(tok.convert_tokens_to_ids("</think>"))
    assert enc["offset_mapping"][i] == (t.index("</think>"), t.index("</think>") + len("</think>"))
    # Prompt and completion tokenized separately concatenate to the joint tokenization (rollouts rely on it).
    ex = synthetic.generate_examples(5, "train", seed=2)
    for e in ex:
        p = templates.render_prompt(e.problem.expression, "synthetic")
        plain = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert plain(p) + plain(e.verbose.text) == plain(p + e.verbose.text)


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


# ------------------------------------------------------------------ the one prompt encoding (issue 11 item 6)
R1_TEMPLATE = (  # DeepSeek-R1-Distill style: the template itself writes BOS
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
CHATML = (  # Qwen / SmolLM2 style: no BOS in the template
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# name -> (bos token or None, tokenizer adds BOS itself, tokenizer adds EOS itself, chat template)
VARIANTS = {
    "r1_distill": ("<bos>", True, False, R1_TEMPLATE),  # Llama-style tokenizer + BOS-writing template
    "llama_chatml": ("<bos>", True, False, CHATML),  # adds BOS, template does not write it
    "qwen": (None, False, False, CHATML),  # no BOS token at all
    "smollm2_like": ("<|im_start|>", False, False, CHATML),  # BOS token == the ChatML turn opener, never added
    "bos_template_no_add": ("<bos>", False, False, R1_TEMPLATE),
    "adds_eos": ("<bos>", True, True, R1_TEMPLATE),  # a prompt must never end in a tokenizer-added EOS
}


def _variant_tokenizer(bos: str | None, add_bos: bool, add_eos: bool, template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>", "<|User|>", "<|Assistant|>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [templates.RAW_THINK.format(problem="1 + 2"), templates.INSTRUCTION, "user assistant system"] * 3
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kw = {"bos_token": bos} if bos is not None else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>", add_bos_token=add_bos,
                                 add_eos_token=add_eos, **kw)
    hf.chat_template = template
    return hf


def _old_rule(tokenizer, text: str) -> list[int]:
    """What Runtime.encode_prompt / scpo eval --hf did before: BOS + encode(text) whatever the template wrote."""
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prompt_ids_equal_the_models_own_tokenization(name):
    bos, add_bos, add_eos, template = VARIANTS[name]
    tok = _variant_tokenizer(bos, add_bos, add_eos, template)
    problem = "What is 1 + 2?"
    ref = tok.apply_chat_template(templates.chat_messages(problem), add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    ids = templates.encode_prompt(problem, "chat", tok)
    assert ids == ref
    template_writes_bos = bos is not None and template.startswith("{{ bos_token }}")
    if template_writes_bos:
        assert ids[0] == tok.bos_token_id != ids[1]  # exactly one BOS in front
    elif bos != "<|im_start|>":
        assert tok.bos_token_id not in ids  # a template without BOS gets none (not even from add_bos_token)
    if name == "r1_distill":  # the fault: the old rule doubled the template's BOS
        assert _old_rule(tok, templates.render_prompt(problem, "chat", tok))[:2] == [tok.bos_token_id] * 2
    # with a LAPO budget: the rendered text's ids, still without added specials
    text = templates.render_prompt(problem, "chat", tok, length_budget=64)
    assert templates.encode_prompt(problem, "chat", tok, length_budget=64) == tok(text, add_special_tokens=False)[
        "input_ids"]
    # raw templates: the tokenizer's own BOS policy (tokenizer(text)), never an added EOS, never a second BOS
    for tpl in ("raw_think", "synthetic"):
        text = templates.render_prompt(problem, tpl)
        plain = tok(text, add_special_tokens=False)["input_ids"]
        expect = ([tok.bos_token_id] if add_bos else []) + plain
        assert templates.encode_prompt(problem, tpl, tok) == expect
        if not add_eos:
            assert expect == tok(text)["input_ids"]
        if bos is not None:  # text that already starts with BOS keeps exactly one
            ids = templates.encode_rendered(bos + text, tpl, tok)
            assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_task_tokenizer_adds_its_bos_once_and_old_dirs_are_upgraded(tok, tmp_path):
    """The tiny model's prompts keep the ids of the old rule (BOS + text): the tokenizer now adds BOS itself."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from megatron_scpo.data.tokenizer import load_tokenizer

    for tpl in ("synthetic", "raw_think"):
        text = templates.render_prompt("1 + 2", tpl)
        assert templates.encode_prompt("1 + 2", tpl, tok) == _old_rule(tok, text)
    chat = templates.encode_prompt("1 + 2", "chat", tok)  # the task chat template writes no BOS
    assert chat == tok.apply_chat_template(templates.chat_messages("1 + 2"), add_generation_prompt=True,
                                           return_dict=False) and tok.bos_token_id not in chat
    # a v1 dir (add_bos_token=False; callers added BOS) loads as a BOS-adding tokenizer with the same vocab
    v1 = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), bos_token=tok.bos_token,
                                 eos_token=tok.eos_token, pad_token=tok.pad_token, add_bos_token=False)
    assert v1("1")["input_ids"][0] != tok.bos_token_id
    v1.save_pretrained(tmp_path / "v1")
    again = load_tokenizer(tmp_path / "v1")
    assert again("1 + 2")["input_ids"] == tok("1 + 2")["input_ids"] and fingerprint(again) == fingerprint(tok)


def test_overlong_prompt_names_the_prompt(tok):
    with pytest.raises(templates.PromptTooLongError, match=r"prompt 'p7' has \d+ tokens > data.max_prompt_tokens=5"):
        templates.encode_prompt("1 + 2", "synthetic", tok, max_tokens=5, name="p7")
    with pytest.raises(ValueError, match="unknown template"):
        templates.encode_rendered("x", "nope", tok)  # type: ignore[arg-type]
