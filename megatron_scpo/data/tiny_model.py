"""The tiny Llama-style model of the embedded default: a config and an HF checkpoint dir built from scratch.

Dimensions follow research/infra.md C: head_dim 64 (hidden 128, 2 heads, 1 KV head) runs on SGLang's CPU
backend as well as vLLM's, and is small enough to sample thousands of ~100-token responses on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from megatron_scpo.data.tokenizer import build_tokenizer

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """LlamaConfig of the tiny model; ``overrides`` replace any default (e.g. ``num_hidden_layers=2``)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    kwargs = {**TINY_DEFAULTS, **overrides, "vocab_size": vocab_size}
    if kwargs["hidden_size"] != kwargs["num_attention_heads"] * kwargs["head_dim"]:
        raise ValueError(
            f"hidden_size {kwargs['hidden_size']} != num_attention_heads {kwargs['num_attention_heads']} * "
            f"head_dim {kwargs['head_dim']}"
        )
    return LlamaConfig(**kwargs)


def init_tiny_model(out_dir: str | Path, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None,
                    **overrides: Any) -> Path:
    """Write a randomly initialised tiny model (config, safetensors, generation config, tokenizer) to ``out_dir``.

    Deterministic in ``seed``. The vocabulary is the tokenizer's full length (added tokens included),
    so every id the tokenizer can produce has an embedding row.
    """
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    config = tiny_llama_config(
        len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **overrides,
    )
    gen = torch.Generator().manual_seed(seed)
    devrng = torch.random.fork_rng(devices=[])
    with devrng:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
