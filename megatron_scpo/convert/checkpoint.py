"""On-disk conversion: HF directory <-> megatron dist-checkpoint (torch_dist) directory.

The Megatron side is megatron-core's own dist-checkpointing format, saved from a model built by
``backend.model.build_model`` at the requested TP/PP. Its tensor keys are global (layer-stacked, TE names), so a
checkpoint written at one TP/PP loads at any other (resharding for free, including the vocab padding: the
embedding / output layer are loaded with megatron's ``allow_shape_mismatch``). Beside megatron's files the
directory holds:

- ``hf/``: the source config.json, generation config and tokenizer files, so ``mcore-to-hf`` needs no
  ``--hf-config`` and the exported HF directory is complete;
- ``scpo_convert.json``: the architecture fields and the layout it was written at, checked against any
  ``--hf-config`` given later (a different config would otherwise load "fine" and be silently wrong).

Every rank of the job calls these functions (torchrun), or a single process does (a private 1-rank gloo group).
Outputs appear all at once: written to a temp dir beside the target and renamed by rank 0 at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_scpo.convert.hf_io import (
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    load_hf_config,
    read_config_dict,
    read_hf_checkpoint,
    read_hf_shapes,
    weight_files,
    write_safetensors,
)
from megatron_scpo.convert.mapping import ArchInfo, ConversionError, arch_info, check_hf_names_and_shapes

META_FILE = "scpo_convert.json"
HF_SUBDIR = "hf"
FORMAT = "scpo-mcore-v1"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_layout_fits(info: ArchInfo, tp: int, pp: int) -> None:
    """TP must divide the heads / KV heads, PP the layers, TP*PP the world size: checked in that order, so
    "tp does not divide heads" is reported as such even in a single process."""
    from megatron_scpo.backend.parallel import check_layout

    kw = dict(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, num_layers=info.num_layers)
    check_layout(tp * pp, tp, pp, **kw)
    check_layout(_world_size(), tp, pp, **kw)


def _setup(info: ArchInfo, tp: int, pp: int) -> None:
    from megatron_scpo.backend.parallel import init_parallel

    check_layout_fits(info, tp, pp)
    init_parallel(tp, pp, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, num_layers=info.num_layers)


def _build(hf_config: Any, tp: int, pp: int) -> list[Any]:
    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.model import build_model

    return build_model(hf_config, ParallelConfig(tp=tp, pp=pp), "float32")


def sharded_state_dict(chunks: Sequence[Any]) -> dict[str, Any]:
    """Megatron sharded state dict of all chunks (keys inside are global, so any chunking reshards)."""
    from megatron_scpo.backend.model import unwrap

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_mcore(chunks: Sequence[Any], directory: str | Path) -> None:
    """Save model weights as a dist checkpoint into an existing empty ``directory`` (collective)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict(chunks), str(directory))


def check_mcore_dir(directory: str | Path) -> None:
    """A dist checkpoint with every shard file its metadata names; a missing shard is named here, not mid-load."""
    from torch.distributed.checkpoint import FileSystemReader

    d = Path(directory)
    if not (d / "metadata.json").is_file() or not (d / ".metadata").is_file():
        raise ConversionError(f"{d}: not a megatron dist checkpoint (metadata.json / .metadata missing)")
    try:
        md = FileSystemReader(str(d)).read_metadata()
    except Exception as e:  # corrupt pickle, truncated file
        raise ConversionError(f"{d}/.metadata: unreadable: {e}") from e
    files = sorted({info.relative_path for info in (md.storage_data or {}).values()})
    absent = [f for f in files if not (d / f).is_file()]
    if absent:
        raise ConversionError(f"{d}: missing checkpoint shard file(s) {absent}")


def _check_shapes_against_model(chunks: Sequence[Any], directory: Path, info: ArchInfo) -> None:
    """Missing / mis-shaped tensors between the checkpoint and the model the config builds, named per key."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(directory))
    problems: list[str] = []
    for sh in nested_values(sharded_state_dict(chunks)):
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in stored:
            problems.append(f"missing {sh.key}")
            continue
        got = tuple(stored[sh.key].global_shape if hasattr(stored[sh.key], "global_shape") else stored[sh.key].shape)
        want = tuple(sh.global_shape)
        if sh.allow_shape_mismatch:  # vocab-padded: only the real vocab rows must be there
            if got[1:] != want[1:] or got[0] < info.vocab:
                problems.append(f"{sh.key}: {got} cannot hold vocab {info.vocab} x {want[1:]}")
        elif got != want:
            problems.append(f"{sh.key}: stored {got} != expected {want}")
    if problems:
        raise ConversionError(f"{directory}: checkpoint does not match the config: {sorted(set(problems))[:8]}")


def load_mcore(chunks: Sequence[Any], directory: str | Path, info: ArchInfo) -> None:
    """Load a dist checkpoint into this rank's chunks (any TP/PP); mismatches raise ConversionError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_scpo.backend.model import unwrap

    d = Path(directory)
    check_mcore_dir(d)
    _check_shapes_against_model(chunks, d, info)
    try:
        loaded = dist_checkpointing.load(sharded_state_dict(chunks), str(d), strict=StrictHandling.RAISE_ALL)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{d}: loading the dist checkpoint failed: {type(e).__name__}: {e}") from e
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for c, k in zip(chunks, keys):
        unwrap(c).load_state_dict(loaded[k], strict=True)


def _meta(info: ArchInfo, tp: int, pp: int, source: str) -> dict[str, Any]:
    import megatron.core

    return {"format": FORMAT, "arch": dataclasses.asdict(info), "saved_tp": tp, "saved_pp": pp,
            "source": source, "megatron_core": getattr(megatron.core, "__version__", "unknown")}


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Convert an HF directory to a megatron dist checkpoint written at TP=tp, PP=pp (collective).

    Everything checkable (config support, tensor names/shapes from the safetensors headers, shard files,
    the layout vs. heads/layers/world size, the output path) is checked before megatron is initialized.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_output_dir(out)
    info = arch_info(read_config_dict(hf_dir), str(hf_dir / "config.json"))
    check_hf_names_and_shapes(read_hf_shapes(weight_files(hf_dir)), info, str(hf_dir))
    check_layout_fits(info, tp, pp)
    hf_config, info, tensors = read_hf_checkpoint(hf_dir)
    _setup(info, tp, pp)
    from megatron_scpo.convert.live import load_hf_into_model

    chunks = _build(hf_config, tp, pp)
    load_hf_into_model(chunks, hf_config, tensors)
    del tensors
    writer = _rank() == 0
    with atomic_output_dir(out, is_writer=writer, barrier=_barrier) as tmp:
        save_mcore(chunks, tmp)
        if writer:
            (tmp / HF_SUBDIR).mkdir()
            copy_side_files(hf_dir, tmp / HF_SUBDIR)
            (tmp / META_FILE).write_text(json.dumps(_meta(info, tp, pp, str(hf_dir)), indent=2) + "\n")
    return out


def _compare_arch(stored: dict[str, Any], info: ArchInfo, source: str) -> None:
    diffs = {k: (stored.get(k), v) for k, v in dataclasses.asdict(info).items() if stored.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise ConversionError(f"{source}: config does not match the checkpoint's architecture ({detail})")


def mcore_to_hf(
    mcore_dir: str | Path, out_dir: str | Path, hf_config_dir: str | Path | None = None, tp: int = 1, pp: int = 1
) -> Path:
    """Convert a dist checkpoint (saved at any TP/PP) to an HF directory: safetensors + config + tokenizer.

    Loads at TP=tp, PP=pp (default 1/1: each rank loads the whole model; rank 0 writes). The config comes
    from ``hf_config_dir`` or the checkpoint's own ``hf/`` copy.
    """
    mdir, out = Path(mcore_dir), Path(out_dir)
    check_output_dir(out)
    if not mdir.is_dir():
        raise ConversionError(f"{mdir}: not a directory")
    cfg_dir = Path(hf_config_dir) if hf_config_dir is not None else mdir / HF_SUBDIR
    if hf_config_dir is None and not (cfg_dir / "config.json").is_file():
        raise ConversionError(f"{mdir}: no {HF_SUBDIR}/config.json stored in the checkpoint; pass --hf-config DIR")
    info = arch_info(read_config_dict(cfg_dir), str(cfg_dir / "config.json"))
    meta_path = mdir / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        _compare_arch(meta.get("arch", {}), info, str(cfg_dir / "config.json"))
    check_mcore_dir(mdir)
    check_layout_fits(info, tp, pp)
    hf_config = load_hf_config(cfg_dir)
    _setup(info, tp, pp)
    chunks = _build(hf_config, tp, pp)
    load_mcore(chunks, mdir, info)
    from megatron_scpo.convert.live import iter_hf_tensors

    writer = _rank() == 0
    with atomic_output_dir(out, is_writer=writer, barrier=_barrier) as tmp:
        stream = iter_hf_tensors(chunks, hf_config)
        if writer:
            write_safetensors(stream, tmp)
            copy_side_files(cfg_dir, tmp)
        else:
            for _ in stream:  # collective: take part in the gathers, keep nothing
                pass
    return out


def read_mcore_meta(mcore_dir: str | Path) -> dict[str, Any]:
    """The ``scpo_convert.json`` of a converted checkpoint (empty dict when absent)."""
    p = Path(mcore_dir) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


__all__ = [
    "hf_to_mcore", "mcore_to_hf", "save_mcore", "load_mcore", "check_mcore_dir", "sharded_state_dict",
    "read_mcore_meta",
]
