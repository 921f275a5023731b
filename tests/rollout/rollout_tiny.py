"""Tiny models and a tiny tokenizer for the rollout tests (built locally, no hub access)."""

from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 300
EOS = 2


def tiny_llama(seed: int = 0, tie: bool = False, vocab: int = VOCAB) -> LlamaForCausalLM:
    """Llama with hidden 64, 2 layers, random init under a fixed seed, fp32."""
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger logits than the default init: sampled text varies, greedy is not constant
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few lines (cached: read-only); ids 0/1/2 are pad/bos/eos, vocab <= VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the answer is 42", "7 + 5 = 12", "let me double-check", "wait, so the total is 36"] * 20
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
