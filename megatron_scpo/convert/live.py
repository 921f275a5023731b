"""HF tensors <-> a live, TP/PP-sharded megatron-core GPTModel (list of model chunks).

``load_hf_into_model`` shards full HF tensors into this rank's parameters; ``iter_hf_tensors`` is the reverse,
streaming full HF-named tensors one at a time (the weight-sync path to the rollout engines and the
``mcore-to-hf`` exporter); engines bucket that stream themselves (``rollout.sglang.bucket_named_tensors``).

Sharding rules (megatron-core 0.16.1 local and TE specs): a TP-sharded tensor is a contiguous slice of the full
Megatron tensor along ``McoreParam.tp_dim``, except ``linear_fc1`` where each rank holds ``[gate_r; up_r]``.
PP: each chunk's ``decoder.layers[i].layer_number`` is the global (1-based) layer; the embedding lives on the
first stage (``pre_process``), final norm and output layer on the last (``post_process``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_scpo.backend.model import HFArch, unwrap
from megatron_scpo.backend.parallel import dist_info
from megatron_scpo.convert.mapping import (
    ConversionError,
    McoreParam,
    NormNames,
    arch_info,
    build_mcore_tensor,
    check_hf_names_and_shapes,
    check_tied_lm_head,
    detect_norm_names,
    hf_shapes,
    layer_params,
    mcore_params,
    shapes_of,
    split_mcore_tensor,
)


@dataclass
class _LocalParam:
    """One parameter of this rank: its mapping (local name) and its global identity (first HF name)."""

    spec: McoreParam
    key: str
    tensor: torch.Tensor


def _tp() -> tuple[int, int, Any]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _local_params(chunks: Sequence[torch.nn.Module], info: HFArch) -> tuple[list[_LocalParam], NormNames]:
    """This rank's parameters, each matched to its mapping; unknown or unmatched parameters are errors."""
    out: list[_LocalParam] = []
    models = [unwrap(c) for c in chunks]
    all_names = [n for m in models for n, _ in m.named_parameters()]
    norms = detect_norm_names(all_names)
    for ci, m in enumerate(models):
        params = dict(m.named_parameters())
        specs: list[McoreParam] = []
        if getattr(m, "pre_process", True):
            specs.append(McoreParam("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",), 0))
        for i, layer in enumerate(m.decoder.layers):
            specs.extend(layer_params(info, i, int(layer.layer_number) - 1, norms))
        if getattr(m, "post_process", True):
            specs.append(McoreParam("decoder.final_layernorm.weight", "copy", ("model.norm.weight",), None))
            if not info.tie_word_embeddings:
                specs.append(McoreParam("output_layer.weight", "vocab", ("lm_head.weight",), 0))
            elif "output_layer.weight" in params:
                # Tied with PP > 1: the last stage keeps its own copy of the embedding (megatron all-reduces
                # their grads). It is loaded from the embedding and never exported.
                specs.append(McoreParam("output_layer.weight", "vocab", ("model.embed_tokens.weight",), 0))
        matched = set()
        for s in specs:
            if s.name not in params:
                raise ConversionError(f"model chunk {ci}: expected parameter {s.name!r} is absent (config mismatch?)")
            matched.add(s.name)
            key = "tied:" + s.hf_names[0] if s.name == "output_layer.weight" and info.tie_word_embeddings else s.hf_names[0]
            out.append(_LocalParam(s, key, params[s.name]))
        extra = sorted(set(params) - matched)
        if extra:
            raise ConversionError(f"model chunk {ci}: parameters with no HF mapping: {extra[:6]}")
    return out, norms


def _tp_slice(p: McoreParam, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if p.tp_dim is None or tp == 1:
        return full
    if p.kind == "fc1":
        return torch.cat([half.chunk(tp, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(tp, dim=p.tp_dim)[rank]


def _tp_gather(p: McoreParam, local: torch.Tensor, tp: int, group: Any) -> torch.Tensor:
    if p.tp_dim is None or tp == 1:
        return local.detach()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    if p.kind == "fc1":
        halves = [x.chunk(2, dim=0) for x in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=p.tp_dim)


@torch.no_grad()
def load_hf_into_model(chunks: Sequence[torch.nn.Module], hf_config: Any, hf: Mapping[str, torch.Tensor]) -> None:
    """Copy full HF tensors into this rank's shards of ``chunks`` (every rank calls it with the same tensors).

    Vocab padding rows are zero-filled. Names/shapes are validated against the config first; every local
    parameter must be covered (nothing left at its random init).
    """
    info = arch_info(hf_config)
    check_hf_names_and_shapes(shapes_of(hf), info, "HF state dict")
    check_tied_lm_head(hf, info, "HF state dict")
    tp, rank, _ = _tp()
    for lp in _local_params(chunks, info)[0]:
        padded = lp.tensor.shape[0] * tp if lp.spec.kind == "vocab" else info.vocab_size
        full = build_mcore_tensor(lp.spec, hf, info, padded)
        shard = _tp_slice(lp.spec, full, tp, rank)
        if tuple(shard.shape) != tuple(lp.tensor.shape):
            raise ConversionError(
                f"{lp.spec.name}: shard shape {tuple(shard.shape)} != model parameter {tuple(lp.tensor.shape)}"
            )
        lp.tensor.copy_(shard)


@torch.no_grad()
def iter_hf_tensors(chunks: Sequence[torch.nn.Module], hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the whole model, one tensor at a time, in HF order.

    Collective: every rank of the model-parallel group must iterate it to the end in lockstep. Each tensor
    is TP-gathered on the stage that owns it and then broadcast over the pipeline group, so **every rank
    (all TP and PP ranks) receives every tensor** (each DP replica does the same independently). Vocab padding
    is stripped; with tied embeddings ``lm_head.weight`` is not yielded (HF ties it to the embedding).
    Tensors are in the model's parameter dtype, on the parameters' device, and are fresh (safe to keep).
    """
    from megatron.core import parallel_state as ps

    info = arch_info(hf_config)
    tp, _, tp_group = _tp()
    local, norms = _local_params(chunks, info)
    by_key = {lp.key: lp for lp in local}
    pp = ps.get_pipeline_model_parallel_world_size()
    owner: dict[str, int] = {}
    if pp > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        keys_per_stage: list[Any] = [None] * pp
        dist.all_gather_object(keys_per_stage, sorted(by_key), group=pp_group)
        pp_ranks = dist.get_process_group_ranks(pp_group)
        for stage, keys in enumerate(keys_per_stage):
            for k in keys:
                owner.setdefault(k, pp_ranks[stage])
    ref = local[0].tensor
    shapes = hf_shapes(info)
    me = dist_info()[0]
    for spec in mcore_params(info, norms):
        key = spec.hf_names[0]
        if pp > 1 and key not in owner:
            raise ConversionError(f"no pipeline stage holds {spec.name!r} ({key})")
        if pp == 1 or owner[key] == me:
            lp = by_key.get(key)
            if lp is None:
                raise ConversionError(f"this rank holds no {spec.name!r} ({key})")
            full = _tp_gather(lp.spec, lp.tensor, tp, tp_group)
            pieces = split_mcore_tensor(spec, full, info)
            if spec.tp_dim is None or tp == 1:
                pieces = [(n, t.clone()) for n, t in pieces]  # never hand out live parameter storage
        else:
            pieces = [(n, torch.empty(shapes[n], dtype=ref.dtype, device=ref.device)) for n in spec.hf_names]
        for name, t in pieces:
            if pp > 1:
                t = t.contiguous()
                dist.broadcast(t, src=owner[key], group=pp_group)
            yield name, t
