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

``mcore_to_hf`` also reads the trainer's own checkpoints (``RUN_DIR/checkpoints/<name>/``, or its ``model/``):
their dist checkpoint also holds optimizer state (``optimizer.*`` keys; RNG and trainer state live beside ``model/``),
which is training state and skipped; the model tensors must all be there. The config comes from the checkpoint's
``hf/`` (written at every save by ``trainer.checkpoint.export_hf``), else the run's ``init_model/`` or its
config's ``model.hf_path``; ``scpo_backend_meta.json`` is checked against it.

Every rank of the job calls these functions (torchrun), or a single process does (a private 1-rank gloo group).
Outputs appear all at once: written to a temp dir beside the target and renamed by rank 0 at the end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_scpo.backend.checkpoint import CKPT_META as BACKEND_META_FILE
from megatron_scpo.backend.model import HFArch
from megatron_scpo.backend.parallel import barrier, check_layout, dist_info, init_parallel
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
from megatron_scpo.convert.mapping import ConversionError, arch_info, check_hf_names_and_shapes

META_FILE = "scpo_convert.json"
HF_SUBDIR = "hf"
FORMAT = "scpo-mcore-v2"  # v2: "arch" holds backend.model.HFArch (v1: the converter's own renamed subset)
# The trainer's checkpoint layout (trainer/checkpoint.py, backend/checkpoint.py), named here so convert never imports
# the trainer: RUN_DIR/checkpoints/<name>/{model/, hf/, rng/, trainer_state.json}, model/scpo_backend_meta.json.
TRAINER_STATE_FILE = "trainer_state.json"
TRAINER_MODEL_SUBDIR = "model"
# First key components of GPTModel tensors. A checkpoint key outside the model the config builds is training state
# (optimizer.*, anything else a trainer stores) unless it starts with one of these: then the config is wrong.
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def check_layout_fits(info: HFArch, tp: int, pp: int) -> None:
    """TP must divide the heads / KV heads, PP the layers, TP*PP the world size: checked in that order, so
    "tp does not divide heads" is reported as such even in a single process."""
    kw = dict(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, num_layers=info.num_layers)
    check_layout(tp * pp, tp, pp, **kw)
    check_layout(dist_info()[1], tp, pp, **kw)


def _setup(info: HFArch, tp: int, pp: int) -> None:
    check_layout_fits(info, tp, pp)
    init_parallel(tp, pp, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, num_layers=info.num_layers)


def _build(hf_config: Any, tp: int, pp: int, dtype: str = "float32") -> list[Any]:
    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.model import build_model

    return build_model(hf_config, ParallelConfig(tp=tp, pp=pp), dtype)


def stored_dtype(directory: str | Path) -> str:
    """``"bfloat16"`` when the checkpoint's word embedding is stored in bf16 (a bf16 training run), else
    ``"float32"``: the model is built in the stored dtype so the load copies bits and the export keeps them."""
    import torch
    from megatron.core import dist_checkpointing

    md = dist_checkpointing.load_tensors_metadata(str(directory))
    emb = md.get("embedding.word_embeddings.weight")
    return "bfloat16" if emb is not None and getattr(emb, "dtype", None) == torch.bfloat16 else "float32"


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


def _check_shapes_against_model(chunks: Sequence[Any], directory: Path, info: HFArch) -> None:
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
            if got[1:] != want[1:] or got[0] < info.vocab_size:
                problems.append(f"{sh.key}: {got} cannot hold vocab {info.vocab_size} x {want[1:]}")
        elif got != want:
            problems.append(f"{sh.key}: stored {got} != expected {want}")
    if problems:
        raise ConversionError(f"{directory}: checkpoint does not match the config: {sorted(set(problems))[:8]}")


def load_mcore(chunks: Sequence[Any], directory: str | Path, info: HFArch) -> None:
    """Load a dist checkpoint into this rank's chunks (any TP/PP); mismatches raise ConversionError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_scpo.backend.model import unwrap

    d = Path(directory)
    check_mcore_dir(d)
    _check_shapes_against_model(chunks, d, info)
    try:
        # RETURN_ALL: megatron's "missing" = stored but not requested (a trainer checkpoint's optimizer state),
        # "unexpected" = requested but not stored. Both are judged below instead of raising on the first.
        loaded, extra, absent = dist_checkpointing.load(sharded_state_dict(chunks), str(d),
                                                        strict=StrictHandling.RETURN_ALL)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{d}: loading the dist checkpoint failed: {type(e).__name__}: {e}") from e
    if absent:
        raise ConversionError(f"{d}: checkpoint lacks model tensors {sorted(absent)[:8]}")
    foreign = sorted(k for k in extra if k.startswith(MODEL_KEY_PREFIXES))
    if foreign:
        raise ConversionError(f"{d}: checkpoint holds model tensors the config does not build {foreign[:8]} "
                              "(wrong --hf-config?)")
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for c, k in zip(chunks, keys):
        unwrap(c).load_state_dict(loaded[k], strict=True)


def _meta(info: HFArch, tp: int, pp: int, source: str) -> dict[str, Any]:
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
    writer = dist_info()[0] == 0
    with atomic_output_dir(out, is_writer=writer, barrier=barrier) as tmp:
        save_mcore(chunks, tmp)
        if writer:
            (tmp / HF_SUBDIR).mkdir()
            copy_side_files(hf_dir, tmp / HF_SUBDIR)
            (tmp / META_FILE).write_text(json.dumps(_meta(info, tp, pp, str(hf_dir)), indent=2) + "\n")
    return out


def _compare_arch(stored: dict[str, Any], info: HFArch, source: str) -> None:
    # fields a v1 checkpoint did not store (or stored under other names) are left to the tensor shape checks
    diffs = {k: (stored[k], v) for k, v in dataclasses.asdict(info).items() if k in stored and stored[k] != v}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise ConversionError(f"{source}: config does not match the checkpoint's architecture ({detail})")


def _run_dir_config(ckpt: Path) -> Path | None:
    """The HF config dir of the training run holding trainer checkpoint ``ckpt`` (RUN_DIR/checkpoints/<name>):
    the tiny model the run wrote (``init_model/``), else its ``config.yaml``'s ``model.hf_path``."""
    run_dir = ckpt.parent.parent
    if (run_dir / "init_model" / "config.json").is_file():
        return run_dir / "init_model"
    cfg_yaml = run_dir / "config.yaml"
    if cfg_yaml.is_file():
        import yaml

        try:
            hf_path = ((yaml.safe_load(cfg_yaml.read_text()) or {}).get("model") or {}).get("hf_path")
        except yaml.YAMLError:
            return None
        if hf_path and (Path(hf_path) / "config.json").is_file():
            return Path(hf_path)
    return None


def resolve_mcore_source(path: str | Path, hf_config_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``(dist checkpoint dir, HF config dir)`` for what a user passes as ``--mcore``.

    Accepts a converted checkpoint (``hf-to-mcore`` output), a trainer checkpoint ``RUN_DIR/checkpoints/<name>``
    or its ``model/`` subdir, or any megatron dist checkpoint (then ``hf_config_dir`` is required). The config
    is ``hf_config_dir`` when given, else the checkpoint's ``hf/``, else the run's (``_run_dir_config``).
    Raises ConversionError when there is no directory or no config.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{p}: not a directory")
    ckpt: Path | None = None  # the trainer checkpoint dir, when it is one
    weights = p
    if not (p / "metadata.json").is_file() and (p / TRAINER_MODEL_SUBDIR / "metadata.json").is_file():
        ckpt, weights = p, p / TRAINER_MODEL_SUBDIR
    elif p.name == TRAINER_MODEL_SUBDIR and (p.parent / TRAINER_STATE_FILE).is_file():
        ckpt = p.parent
    if hf_config_dir is not None:
        return weights, Path(hf_config_dir)
    for cand in (weights / HF_SUBDIR, *([ckpt / HF_SUBDIR] if ckpt is not None else [])):
        if (cand / "config.json").is_file():
            return weights, cand
    run_cfg = _run_dir_config(ckpt) if ckpt is not None else None
    if run_cfg is not None:
        return weights, run_cfg
    raise ConversionError(f"{p}: no {HF_SUBDIR}/config.json stored in the checkpoint; pass --hf-config DIR")


def _check_backend_meta(weights: Path, info: HFArch, source: str) -> None:
    """A trainer checkpoint's ``scpo_backend_meta.json`` (model_type, vocab, layers, hidden) vs the config."""
    p = weights / BACKEND_META_FILE
    if not p.is_file():
        return
    meta = json.loads(p.read_text())
    fields = ("model_type", "vocab_size", "num_layers", "hidden_size")  # HFArch's names, as the backend writes them
    diffs = [f"{k}: checkpoint {meta[k]!r} vs config {getattr(info, k)!r}" for k in fields
             if k in meta and meta[k] != getattr(info, k)]
    if diffs:
        raise ConversionError(f"{source}: config does not match the checkpoint's architecture ({', '.join(diffs)})")


def mcore_to_hf(
    mcore_dir: str | Path, out_dir: str | Path, hf_config_dir: str | Path | None = None, tp: int = 1, pp: int = 1
) -> Path:
    """Convert a dist checkpoint (saved at any TP/PP) to an HF directory: safetensors + config + tokenizer.

    ``mcore_dir``: an ``hf-to-mcore`` output, or a trainer checkpoint (``RUN_DIR/checkpoints/<name>`` or its
    ``model/``; optimizer state in it is skipped). Loads at TP=tp, PP=pp (default 1/1: each rank loads the whole
    model; rank 0 writes), in the stored dtype (bf16 checkpoints export bf16 safetensors). The config comes
    from ``hf_config_dir`` or the checkpoint's own ``hf/`` (``resolve_mcore_source``).
    """
    out = Path(out_dir)
    check_output_dir(out)
    mdir, cfg_dir = resolve_mcore_source(mcore_dir, hf_config_dir)
    info = arch_info(read_config_dict(cfg_dir), str(cfg_dir / "config.json"))
    meta_path = mdir / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        _compare_arch(meta.get("arch", {}), info, str(cfg_dir / "config.json"))
    _check_backend_meta(mdir, info, str(cfg_dir / "config.json"))
    check_mcore_dir(mdir)
    check_layout_fits(info, tp, pp)
    hf_config = load_hf_config(cfg_dir)
    _setup(info, tp, pp)
    chunks = _build(hf_config, tp, pp, stored_dtype(mdir))
    load_mcore(chunks, mdir, info)
    from megatron_scpo.convert.live import iter_hf_tensors

    writer = dist_info()[0] == 0
    with atomic_output_dir(out, is_writer=writer, barrier=barrier) as tmp:
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
    "read_mcore_meta", "resolve_mcore_source", "stored_dtype",
]
