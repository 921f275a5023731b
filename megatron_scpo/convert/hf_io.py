"""HF checkpoint directories on disk: config, safetensors (single or index-sharded), tokenizer side files.

Also the all-or-nothing output directory used by every converter: outputs are written to a temp dir beside the
target and renamed at the end, so a failed conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_scpo.atomic import default_file_mode, replace_dir
from megatron_scpo.backend.model import HFArch
from megatron_scpo.convert.mapping import ConversionError, arch_info, check_hf_names_and_shapes

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_WEIGHT_INDEXES = (SAFE_INDEX, "pytorch_model.bin.index.json")


def read_config_dict(hf_dir: str | Path) -> dict[str, Any]:
    """config.json as a dict, with file-named errors (read before anything heavy is imported or loaded)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found (is {hf_dir} an HF model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def load_hf_config(hf_dir: str | Path) -> Any:
    """The transformers config object (after our own support check, so errors name our supported set)."""
    arch_info(read_config_dict(hf_dir), str(Path(hf_dir) / "config.json"))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)


def weight_files(hf_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file; a missing shard named by the index is an error, before any load."""
    d = Path(hf_dir)
    index = d / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        files = {name: d / fname for name, fname in weight_map.items()}
        absent = sorted({p.name for p in files.values() if not p.is_file()})
        if absent:
            raise ConversionError(f"{index}: missing shard file(s) {absent} in {d}")
        return files
    single = d / SAFE_SINGLE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        raise ConversionError(f"{d}: only safetensors checkpoints are supported (found pytorch_model.bin)")
    raise ConversionError(f"{d}: no {SAFE_SINGLE} or {SAFE_INDEX}")


def _group_by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    return by_file


def read_hf_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from safetensors headers only (no tensor data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, names in _group_by_file(files).items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for n in names:
                if n not in present:
                    raise ConversionError(f"{path}: tensor {n!r} listed in the index is not in the file")
                shapes[n] = tuple(f.get_slice(n).get_shape())
    return shapes


class LazyHFTensors(Mapping[str, torch.Tensor]):
    """The tensors of an HF safetensors checkpoint, read from disk only when accessed.

    ``load_hf_into_model`` touches only the tensors this rank's shards need, one at a time, so a rank's peak
    memory is its own shards plus one full tensor, not the whole model. ``shapes`` comes from the headers.
    """

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> None:
        self._files = files
        self.shapes = shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(name)
        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_hf_checkpoint(hf_dir: str | Path) -> tuple[Any, HFArch, LazyHFTensors]:
    """Config, arch info and the (lazily read) validated state dict of an HF model directory.

    Names and shapes are checked against the config from the file headers; no tensor data is read here.
    """
    cfg_dict = read_config_dict(hf_dir)
    info = arch_info(cfg_dict, str(Path(hf_dir) / "config.json"))
    files = weight_files(hf_dir)
    shapes = read_hf_shapes(files)
    check_hf_names_and_shapes(shapes, info, str(hf_dir))
    return load_hf_config(hf_dir), info, LazyHFTensors(files, shapes)


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write (name, tensor) pairs as HF safetensors: one file, or shards + index when over ``max_shard_bytes``.

    Tensors are consumed as they come and a shard is flushed when full, so peak memory is one shard.
    Returns the written file names.
    """
    out = Path(out_dir)
    shard: dict[str, torch.Tensor] = {}  # only the shard being filled is held: a flushed one is released
    size = 0
    tmp_names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-part{len(tmp_names):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        default_file_mode(out / name)
        tmp_names.append(name)
        for k in shard:
            weight_map[k] = name
        shard.clear()

    for name, t in tensors:
        if name in weight_map or name in shard:
            raise ConversionError(f"duplicate tensor name {name!r} in export")
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t.detach().cpu().contiguous()
        size += nbytes
        total += nbytes
    if shard or not tmp_names:
        flush()
    if len(tmp_names) == 1:
        os.replace(out / tmp_names[0], out / SAFE_SINGLE)
        return [SAFE_SINGLE]
    n = len(tmp_names)
    final = {t: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, t in enumerate(tmp_names)}
    for t, f in final.items():
        os.replace(out / t, out / f)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*final.values(), SAFE_INDEX]


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config / generation config / tokenizer files (every top-level non-weight file) from src to dst."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES:
            shutil.copy2(p, Path(dst) / p.name)
            copied.append(p.name)
    return copied


def check_output_dir(target: str | Path) -> Path:
    """Refuse to overwrite: a non-empty existing target is an error (raised before any work)."""
    t = Path(target)
    if t.exists() and (not t.is_dir() or any(t.iterdir())):
        raise ConversionError(f"{t}: output already exists and is not an empty directory")
    return t


def temp_dir_for(target: str | Path) -> Path:
    """The (deterministic, so every rank agrees) temp dir beside ``target``."""
    t = Path(target).resolve()
    return t.parent / f".{t.name}.scpo-partial"


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, *, is_writer: bool = True, barrier: Any = None) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success rename it to ``target``, on failure delete it.

    Multi-rank: every rank enters with the same target; only ``is_writer`` (rank 0) creates, renames and
    removes, and ``barrier()`` (when given) orders those steps against the other ranks' writes.
    """
    t = check_output_dir(target)
    tmp = temp_dir_for(t)
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    try:
        yield tmp
        if barrier:
            barrier()
        if is_writer:
            replace_dir(tmp, t)  # an existing t is empty (checked above)
    except BaseException:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier:
        barrier()
