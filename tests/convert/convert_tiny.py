"""Tiny HF models for the conversion tests: built from configs (no downloads), fp32, eager attention.

Dims per the issue: 2 layers, hidden 64, 4 heads, 2 KV heads (GQA), intermediate 128, vocab 300 (not a
multiple of 128, so Megatron pads it). Weights get a random perturbation so that zero-initialized biases and
unit norms are not trivially equal to each other (a swapped q/k bias or norm would otherwise go unnoticed).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6,
)
# name -> (config class name, extra config fields)
ARCHS: dict[str, tuple[str, dict]] = {
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),  # head_dim != hidden/heads (16)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=5e5)),
}


def tiny_config(arch: str):
    import transformers

    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**COMMON, **extra)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(arch: str, seed: int = 0):
    """A deterministic tiny HF model (same weights on every rank for the same seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager").float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """HF names -> tensors as save_pretrained writes them (no lm_head when tied)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_tiny(arch: str, directory: Path, seed: int = 0) -> Path:
    model = tiny_model(arch, seed)
    model.save_pretrained(str(directory))
    return directory
