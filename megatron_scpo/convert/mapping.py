"""HF <-> megatron-core GPTModel tensor names and layouts (Llama, Qwen2, Qwen3), on full (unsharded) tensors.

Everything here is pure torch on whole tensors: the TP/PP sharding of a live model lives in ``live.py`` and the
on-disk formats in ``hf_io.py`` / ``checkpoint.py``. Keeping the layout math in one place means the
checkpoint converter and the weight-sync export cannot disagree.

Layouts that differ between HF and Megatron (the classic silent-bug sources, research/anchors.md 4.5):

- **QKV.** HF stores ``q_proj`` / ``k_proj`` / ``v_proj`` separately. Megatron fuses them per KV head (query
  group): for each group g, ``[q heads of g (nh/ng rows of head_dim), k_g, v_g]``, groups concatenated. A plain
  ``[Q; K; V]`` concat is only right when ng == 1 and gives garbage for GQA. The per-group layout is what makes a
  contiguous TP slice hold whole groups.
- **Gated MLP.** ``linear_fc1 = [gate; up]`` (TP shards each half separately, see live.py).
- **Vocab padding.** Megatron's embedding / output layer have ``padded_vocab`` rows (a multiple of 128*TP);
  padding rows are zero on import and stripped on export, so they never leak into HF checkpoints.
- **Tied embeddings.** With ``tie_word_embeddings`` there is no ``output_layer.weight`` (and no ``lm_head.weight``
  on the HF side); the flag is read from the config, never guessed from tensor names.
- **Norm names.** The local layer spec names the pre-attention / pre-MLP norms ``input_layernorm.weight`` /
  ``pre_mlp_layernorm.weight``; the Transformer-Engine spec fuses them into the next linear as
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (megatron's dist-checkpoint keys always use
  the TE names, so checkpoints move between specs for free).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_scpo.backend.model import HFArch, UnsupportedModelError, parse_hf_config

NormNames = Literal["local", "te"]


class ConversionError(ValueError):
    """A checkpoint or config cannot be converted; the message names the file / tensor / field at fault."""


def arch_info(hf_config: Any, source: str = "config.json") -> HFArch:
    """``backend.model.parse_hf_config`` (the one parser: one definition of what we can reproduce exactly) with its
    errors as ConversionError naming ``source``, raised before any expensive work."""
    try:
        return parse_hf_config(hf_config)
    except UnsupportedModelError as e:
        raise ConversionError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------------------------- names, shapes

def hf_layer_shapes(info: HFArch, layer: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of one decoder layer."""
    p = f"model.layers.{layer}."
    h, hd = info.hidden_size, info.head_dim
    out: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (info.num_heads * hd, h),
        p + "self_attn.k_proj.weight": (info.num_kv_heads * hd, h),
        p + "self_attn.v_proj.weight": (info.num_kv_heads * hd, h),
    }
    if info.qkv_bias:
        out[p + "self_attn.q_proj.bias"] = (info.num_heads * hd,)
        out[p + "self_attn.k_proj.bias"] = (info.num_kv_heads * hd,)
        out[p + "self_attn.v_proj.bias"] = (info.num_kv_heads * hd,)
    if info.qk_norm:
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
    out[p + "self_attn.o_proj.weight"] = (h, info.num_heads * hd)
    out[p + "post_attention_layernorm.weight"] = (h,)
    out[p + "mlp.gate_proj.weight"] = (info.intermediate_size, h)
    out[p + "mlp.up_proj.weight"] = (info.intermediate_size, h)
    out[p + "mlp.down_proj.weight"] = (h, info.intermediate_size)
    return out


def hf_shapes(info: HFArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name -> shape, in the canonical order (embedding, layers, final norm, lm_head)."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (info.vocab_size, info.hidden_size)}
    for i in range(info.num_layers):
        out.update(hf_layer_shapes(info, i))
    out["model.norm.weight"] = (info.hidden_size,)
    if not info.tie_word_embeddings:
        out["lm_head.weight"] = (info.vocab_size, info.hidden_size)
    return out


def check_hf_names_and_shapes(
    shapes: Mapping[str, tuple[int, ...]], info: HFArch, source: str
) -> None:
    """Config/weights mismatch -> one ConversionError listing missing, unexpected and mis-shaped tensors.

    A tied checkpoint may still carry ``lm_head.weight`` (some exporters write it); it is accepted here and
    checked for equality with the embedding when loaded.
    """
    expected = hf_shapes(info)
    got = dict(shapes)
    if info.tie_word_embeddings:
        got.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected and not _ignorable(k)]
    bad = [f"{k}: {tuple(got[k])} != expected {expected[k]}" for k in expected if k in got
           and tuple(got[k]) != expected[k]]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing tensors {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_short(unexpected)}")
        if bad:
            parts.append(f"shape mismatches {_short(bad)}")
        raise ConversionError(f"{source}: weights do not match the config ({info.model_type}): " + "; ".join(parts))


def _ignorable(name: str) -> bool:
    # Rotary inverse frequencies are buffers some old exporters saved; they are recomputed from the config.
    return name.endswith("rotary_emb.inv_freq")


def _short(items: list[str], n: int = 6) -> str:
    return str(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def norm_names(style: NormNames) -> tuple[str, str]:
    """(pre-attention norm, pre-MLP norm) parameter names inside a Megatron layer for a layer spec."""
    if style == "te":
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def detect_norm_names(param_names: list[str]) -> NormNames:
    """Which layer spec produced these Megatron parameter names."""
    return "te" if any(n.endswith("linear_qkv.layer_norm_weight") for n in param_names) else "local"


# ------------------------------------------------------------------------------------------ layout transforms

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: HFArch) -> torch.Tensor:
    """HF q/k/v (weights [rows, hidden] or biases [rows]) -> Megatron's per-query-group fused QKV."""
    ng, hd = info.num_kv_heads, info.head_dim
    tail = q.shape[1:]
    qg = q.reshape(ng, info.heads_per_group * hd, *tail)
    kg = k.reshape(ng, hd, *tail)
    vg = v.reshape(ng, hd, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(info.qkv_rows, *tail)


def split_qkv(qkv: torch.Tensor, info: HFArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``; also valid on a TP shard when ``info`` has that shard's head counts."""
    ng, hd = info.num_kv_heads, info.head_dim
    tail = qkv.shape[1:]
    g = qkv.reshape(ng, (info.heads_per_group + 2) * hd, *tail)
    q, k, v = torch.split(g, [info.heads_per_group * hd, hd, hd], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous())


def pad_vocab(t: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Append zero rows up to ``padded_vocab`` (never truncates: that would drop real tokens)."""
    if padded_vocab < t.shape[0]:
        raise ConversionError(f"padded vocab {padded_vocab} is smaller than the real vocab {t.shape[0]}")
    if padded_vocab == t.shape[0]:
        return t
    return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])], dim=0)


# --------------------------------------------------------------------------------- per-tensor name mapping

@dataclass(frozen=True)
class McoreParam:
    """How one Megatron parameter (global layer numbering) is built from HF tensors.

    ``kind``: ``copy`` (one HF tensor), ``qkv`` (3 HF tensors fused), ``fc1`` (gate, up), ``vocab`` (one HF
    tensor, vocab-padded). ``tp_dim``: the dimension megatron shards over TP (None = replicated);
    ``fc1`` is sharded per half.
    """

    name: str
    kind: Literal["copy", "qkv", "fc1", "vocab"]
    hf_names: tuple[str, ...]
    tp_dim: int | None


def mcore_params(info: HFArch, norms: NormNames = "local") -> list[McoreParam]:
    """Every Megatron parameter of the full model (global layer index), in HF order."""
    out = [McoreParam("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",), 0)]
    for i in range(info.num_layers):
        out.extend(layer_params(info, i, i, norms))
    out.append(McoreParam("decoder.final_layernorm.weight", "copy", ("model.norm.weight",), None))
    if not info.tie_word_embeddings:
        out.append(McoreParam("output_layer.weight", "vocab", ("lm_head.weight",), 0))
    return out


def layer_params(info: HFArch, local: int, global_: int, norms: NormNames = "local") -> list[McoreParam]:
    """Megatron params of decoder layer ``local`` (index inside a chunk) that holds global layer ``global_``."""
    m, h = f"decoder.layers.{local}.", f"model.layers.{global_}."
    ln1, ln2 = norm_names(norms)
    a = h + "self_attn."
    out = [
        McoreParam(m + ln1, "copy", (h + "input_layernorm.weight",), None),
        McoreParam(m + "self_attention.linear_qkv.weight", "qkv",
                   (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), 0),
    ]
    if info.qkv_bias:
        out.append(McoreParam(m + "self_attention.linear_qkv.bias", "qkv",
                              (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), 0))
    if info.qk_norm:
        out.append(McoreParam(m + "self_attention.q_layernorm.weight", "copy", (a + "q_norm.weight",), None))
        out.append(McoreParam(m + "self_attention.k_layernorm.weight", "copy", (a + "k_norm.weight",), None))
    out += [
        McoreParam(m + "self_attention.linear_proj.weight", "copy", (a + "o_proj.weight",), 1),
        McoreParam(m + ln2, "copy", (h + "post_attention_layernorm.weight",), None),
        McoreParam(m + "mlp.linear_fc1.weight", "fc1", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), 0),
        McoreParam(m + "mlp.linear_fc2.weight", "copy", (h + "mlp.down_proj.weight",), 1),
    ]
    return out


def build_mcore_tensor(p: McoreParam, hf: Mapping[str, torch.Tensor], info: HFArch, padded_vocab: int) -> torch.Tensor:
    """The full (TP=1 layout) Megatron tensor for ``p`` from HF tensors."""
    srcs = [hf[n] for n in p.hf_names]
    if p.kind == "qkv":
        return fuse_qkv(*srcs, info)
    if p.kind == "fc1":
        return torch.cat(srcs, dim=0)
    if p.kind == "vocab":
        return pad_vocab(srcs[0], padded_vocab)
    return srcs[0]


def split_mcore_tensor(p: McoreParam, t: torch.Tensor, info: HFArch) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``build_mcore_tensor``: a full Megatron tensor -> its HF tensors (padding stripped)."""
    if p.kind == "qkv":
        return list(zip(p.hf_names, split_qkv(t, info)))
    if p.kind == "fc1":
        gate, up = torch.chunk(t, 2, dim=0)
        return [(p.hf_names[0], gate.contiguous()), (p.hf_names[1], up.contiguous())]
    if p.kind == "vocab":
        return [(p.hf_names[0], t[: info.vocab_size].contiguous())]
    return [(p.hf_names[0], t)]


def shapes_of(hf: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes without reading lazily-loaded tensors (``hf_io.LazyHFTensors.shapes``)."""
    shapes = getattr(hf, "shapes", None)
    return dict(shapes) if shapes is not None else {k: tuple(v.shape) for k, v in hf.items()}


def hf_to_mcore(hf: Mapping[str, torch.Tensor], info: HFArch, padded_vocab: int,
                norms: NormNames = "local") -> dict[str, torch.Tensor]:
    """Full HF state dict -> full Megatron state dict (TP=1 layout, global layer numbers)."""
    check_hf_names_and_shapes(shapes_of(hf), info, "HF state dict")
    check_tied_lm_head(hf, info, "HF state dict")
    return {p.name: build_mcore_tensor(p, hf, info, padded_vocab) for p in mcore_params(info, norms)}


def mcore_to_hf(mc: Mapping[str, torch.Tensor], info: HFArch, norms: NormNames | None = None) -> dict[str, torch.Tensor]:
    """Full Megatron state dict (TP=1 layout) -> HF state dict; ``norms`` is detected when None."""
    norms = norms or detect_norm_names(list(mc))
    params = mcore_params(info, norms)
    missing = [p.name for p in params if p.name not in mc]
    if missing:
        raise ConversionError(f"Megatron state dict: missing tensors {_short(missing)}")
    out: dict[str, torch.Tensor] = {}
    for p in params:
        out.update(split_mcore_tensor(p, mc[p.name], info))
    return out


def check_tied_lm_head(hf: Mapping[str, torch.Tensor], info: HFArch, source: str) -> None:
    """A tied model whose checkpoint carries a *different* lm_head would be silently mis-converted."""
    if info.tie_word_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
        raise ConversionError(
            f"{source}: tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
            "fix the config (set tie_word_embeddings=false) or the checkpoint"
        )
