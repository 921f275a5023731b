"""A megatron-core GPTModel from a Hugging Face config (Llama, Qwen2, Qwen3), numerically equal to HF.

Every TransformerConfig flag that changes the math is set explicitly from the HF config (not left to
megatron's defaults), because the convert engineer's test requires Megatron logits == HF logits to 1e-5
after weight mapping:

- RMSNorm with the HF ``rms_norm_eps`` (``normalization="RMSNorm"``, ``layernorm_epsilon``), pre-norm
  (``apply_residual_connection_post_layernorm=False``);
- SwiGLU MLP (``gated_linear_unit=True``, ``activation_func=F.silu``), no linear biases
  (``add_bias_linear=False``) except Qwen2's q/k/v bias (``add_qkv_bias=True``);
- GQA (``num_query_groups``), explicit ``kv_channels = head_dim`` (Qwen3's head_dim != hidden/heads),
  softmax scale 1/sqrt(head_dim) (megatron's default given kv_channels), Qwen3's per-head q/k RMSNorm
  (``qk_layernorm=True``), applied before RoPE as in HF;
- RoPE: ``rotary_base`` = HF rope_theta, ``rotary_percent=1.0``, rotate-half layout
  (``rotary_interleaved=False``), fusions off.
- vocab padded to a multiple of 128*TP (padded rows are sliced away / masked by the log-prob code).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_scpo.backend import cpu_shim
from megatron_scpo.backend.config import ParallelConfig
from megatron_scpo.backend.parallel import check_layout

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
VOCAB_PAD_MULTIPLE = 128


class UnsupportedModelError(ValueError):
    """The HF config describes an architecture (or an option of one) this builder cannot reproduce exactly, or
    lacks a field it needs."""


@dataclass(frozen=True)
class HFArch:
    """The HF config fields that matter, normalized across transformers 4.x / 5.x spellings.

    The one parsed form of an HF config: the model builder, the policy and the converter (``convert.mapping``:
    tensor names, shapes and the QKV layout) all read it; ``parse_hf_config`` is its only constructor in code.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    attention_dropout: float
    initializer_range: float

    @property
    def heads_per_group(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: ``(num_heads + 2 * num_kv_heads) * head_dim``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _rope_theta(cfg: Any) -> float:
    """transformers 5 keeps RoPE settings in ``rope_parameters``; 4.x in ``rope_theta`` / ``rope_scaling``."""
    params = _get(cfg, "rope_parameters") or {}
    scaling = _get(cfg, "rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} is not supported (only plain RoPE); "
            f"rope_parameters={params or None} rope_scaling={scaling or None}"
        )
    theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    return float(theta)


REQUIRED_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def parse_hf_config(hf_config: Any) -> HFArch:
    """Read an HF config object or config.json dict; unsupported architectures/options raise one clear error.

    Raises UnsupportedModelError naming the field: an unsupported ``model_type`` or option, or the missing ones of
    ``REQUIRED_FIELDS`` (``convert.mapping.arch_info`` adds the config file's path).
    """
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = _get(hf_config, "architectures")
        raise UnsupportedModelError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
            f"supported model_type values: {list(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [k for k in REQUIRED_FIELDS if _get(hf_config, k) is None]
    if missing:
        raise UnsupportedModelError(f"{model_type}: missing field(s) {missing}")
    act = _get(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{model_type}: hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")
    if model_type in ("qwen2", "qwen3") and _get(hf_config, "use_sliding_window", False):
        raise UnsupportedModelError(f"{model_type}: use_sliding_window=True is not supported")
    if model_type == "llama" and _get(hf_config, "mlp_bias", False):
        raise UnsupportedModelError("llama: mlp_bias=True is not supported")
    attention_bias = bool(_get(hf_config, "attention_bias", False))
    if model_type in ("llama", "qwen3") and attention_bias:
        raise UnsupportedModelError(f"{model_type}: attention_bias=True (bias on o_proj too) is not supported")
    hidden = int(_get(hf_config, "hidden_size"))
    heads = int(_get(hf_config, "num_attention_heads"))
    kv_heads = int(_get(hf_config, "num_key_value_heads") or heads)
    head_dim = _get(hf_config, "head_dim") or hidden // heads
    if heads % kv_heads != 0:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return HFArch(
        model_type=model_type,
        vocab_size=int(_get(hf_config, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_get(hf_config, "intermediate_size")),
        num_layers=int(_get(hf_config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf_config),
        max_position_embeddings=int(_get(hf_config, "max_position_embeddings", 4096)),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        initializer_range=float(_get(hf_config, "initializer_range", 0.02)),
    )


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocab rounded up to a multiple of 128*TP, as Megatron-LM pads it (each TP shard stays 128-aligned)."""
    if vocab_size < 1 or tp < 1:
        raise ValueError(f"vocab_size and tp must be >= 1, got vocab_size={vocab_size} tp={tp}")
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"model.dtype={dtype!r} is not supported; choose one of ['float32', 'bfloat16']")
    return table[dtype]


def transformer_config_from_hf(
    hf_config: Any, parallel: ParallelConfig, dtype: str | torch.dtype = "float32", **overrides: Any
) -> Any:
    """The megatron ``TransformerConfig`` that reproduces the HF model's forward (see module docstring)."""
    from megatron.core.transformer import TransformerConfig

    arch = parse_hf_config(hf_config)
    check_layout(
        parallel.tp * parallel.pp,
        parallel.tp,
        parallel.pp,
        vpp=getattr(parallel, "vpp", 1),
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        num_layers=arch.num_layers,
    )
    tdtype = _torch_dtype(dtype)
    on_cpu = cpu_shim.needed()
    vpp = getattr(parallel, "vpp", 1)
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        apply_residual_connection_post_layernorm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        sequence_parallel=bool(parallel.sequence_parallel and parallel.tp > 1),
        params_dtype=tdtype,
        pipeline_dtype=tdtype,
        bf16=tdtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        # No fused kernels: exact parity with HF and identical code paths on CPU and GPU.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # CPU: the P2P sync is a torch.cuda.synchronize (research/megatron_cpu.md step 4).
        batch_p2p_sync=not on_cpu,
        # Interleaved PP=2: next and previous stage are the same peer, and the batched P2P path posts
        # [send_prev(grad), send_next(act)] against the peer's [recv_prev(act), recv_next(grad)]; matched in
        # posting order, the same-shaped activation and gradient swap silently once the steady state
        # sends both (>pp micro-batches; wrong loss and grads, measured on gloo). megatron's unbatched path
        # orders by rank parity and uses two groups for PP=2, which is correct.
        batch_p2p_comm=not (parallel.pp == 2 and vpp > 1),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def te_available() -> bool:
    """Transformer Engine is usable only with CUDA; on CPU the local (pure torch) spec is used."""
    if cpu_shim.needed():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def packed_dot_product_attention() -> type:
    """megatron's local ``DotProductAttention`` that also takes packed (THD) sequences.

    The local core attention asserts ``packed_seq_params is None`` (megatron supports THD only through
    ``TEDotProductAttention``). With ``qkv_format == "thd"`` this subclass gets q/k/v as ``[T, heads, dim]``
    (already rotated per sequence by ``apply_rotary_pos_emb`` with ``cu_seqlens``), regroups them by sequence
    into ``[L, n, heads, dim]`` (``packing.segment_grid``; n sequences, L the longest, zeros after each end) and
    runs the unchanged local attention with megatron's causal mask: exactly the block-diagonal causal attention
    of TE's THD kernel (a real token never sees the zeros after its sequence, which come later), at the padded
    layout's O(n L^2) cost instead of the O(T^2) of a dense mask over the packed row. Output ``[T, 1, h]``,
    which megatron's ``Attention`` reshapes as it does TE's THD output. Without packed params: the parent.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_scpo.backend.packing import segment_grid

    class PackedDotProductAttention(DotProductAttention):
        def forward(self, query: Any, key: Any, value: Any, attention_mask: Any, attn_mask_type: Any = None,
                    attention_bias: Any = None, packed_seq_params: Any = None) -> Any:
            if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)
            if attention_mask is not None:
                raise ValueError("packed (thd) attention takes its boundaries from cu_seqlens, not attention_mask")
            flat, n, length = segment_grid(packed_seq_params.cu_seqlens_q)
            flat = flat.to(query.device)

            def grid(x: Any) -> Any:  # [T, g, d] -> [L, n, g, d]
                out = x.new_zeros((n * length,) + tuple(x.shape[1:])).index_copy(0, flat, x)
                return out.view((n, length) + tuple(x.shape[1:])).transpose(0, 1).contiguous()

            ctx = super().forward(grid(query), grid(key), grid(value), None, attn_mask_type=attn_mask_type,
                                  attention_bias=attention_bias)  # [L, n, h]
            return ctx.transpose(0, 1).reshape(n * length, -1).index_select(0, flat).unsqueeze(1)

    return PackedDotProductAttention


def layer_spec(config: Any, use_te: bool | None = None) -> Any:
    """The TE spec when Transformer Engine is importable (GPU), else megatron's local spec.

    The local spec's core attention is ``packed_dot_product_attention()`` (the local attention plus packed
    THD input); TE's ``TEDotProductAttention`` takes THD natively (``PackedSeqParams``, cu_seqlens).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te if use_te is not None else te_available():
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    spec.submodules.self_attention.submodules.core_attention = packed_dot_product_attention()  # one class (cached)
    return spec


def build_model(
    hf_config: Any,
    parallel: ParallelConfig,
    dtype: str | torch.dtype = "float32",
    *,
    use_te: bool | None = None,
    wrap_fp16: bool = True,
    **config_overrides: Any,
) -> list[Any]:
    """Build this rank's GPTModel chunk(s): one entry per virtual-pipeline stage (a list of one without VPP).

    Requires ``init_parallel`` with the same tp/pp(/vpp). With bf16 and ``wrap_fp16`` each chunk is wrapped
    in megatron's ``Float16Module`` (casts inputs, returns fp32 logits, as Megatron-LM does); use
    ``unwrap(model)`` to reach the GPTModel and its state-dict names.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    arch = parse_hf_config(hf_config)
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model needs megatron's parallel state: call init_parallel(tp, pp) first")
    live_tp, live_pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (live_tp, live_pp) != (parallel.tp, parallel.pp):
        raise ValueError(
            f"parallel config tp={parallel.tp} pp={parallel.pp} differs from the initialized layout "
            f"tp={live_tp} pp={live_pp}"
        )
    config = transformer_config_from_hf(hf_config, parallel, dtype, **config_overrides)
    spec = layer_spec(config, use_te)
    vpp = getattr(parallel, "vpp", 1)
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(arch.vocab_size, parallel.tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=arch.rope_theta,
            vp_stage=stage,
        )
        if config.bf16 and wrap_fp16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
        chunks.append(model)
    return chunks


def unwrap(model: Any) -> Any:
    """Strip DDP / Float16Module wrappers down to the GPTModel."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model
