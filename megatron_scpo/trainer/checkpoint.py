"""Run-dir layout and atomic checkpoints of the trainer's own state.

Layout of a run dir::

    RUN_DIR/config.yaml            resolved config of the run
    RUN_DIR/metrics.jsonl          one record per step (metrics.py)
    RUN_DIR/tb/                    TensorBoard
    RUN_DIR/eval/<label>.json      evaluation results (evaluate.py), read by the report
    RUN_DIR/checkpoints/step_000123/   complete checkpoints only:
        model/                     backend checkpoint (model + optimizer + Megatron RNG)
        hf/                        config.json, generation_config.json, tokenizer files of the run's model;
                                   with ``checkpoint.save_hf`` also model.safetensors (or shards + index):
                                   a complete HF model dir (``scpo eval --hf``, vLLM/SGLang, transformers)
        trainer_state.json         stage, step counters, data position, method state, metrics count
        rng_rank{r}.pt             python/numpy/torch RNG of every rank
    RUN_DIR/checkpoints/latest     name of the newest complete checkpoint (step or snapshot)
    RUN_DIR/checkpoints/<stage>/   stage-end snapshots (never pruned; comparisons start from them)

A checkpoint is written into ``<name>.tmp`` and renamed after every file is fsynced, then ``latest`` is
replaced atomically; a crash at any point leaves either the previous or the new checkpoint, never a
half one that looks complete (``trainer_state.json`` is written last inside the temp dir). The HF copy is
written inside that temp dir too, so it is exactly as atomic as the rest (the peers: verl's
``checkpoint.save_contents: [hf_model]``, slime's ``--save-hf``, OpenRLHF's ``--save_hf_ckpt``, which write it
beside the checkpoint). ``scpo convert mcore-to-hf --mcore RUN_DIR/checkpoints/<name>`` reads ``hf/``'s config.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_scpo.convert.checkpoint import HF_SUBDIR  # one name: the converter reads the config from there

STATE_FILE = "trainer_state.json"
STEP_RE = re.compile(r"^step_(\d{6,})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (files first, then their directories)."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def export_hf(out: Path, source_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]] | None, *,
              is_writer: bool) -> list[str]:
    """Write an HF model dir ``out``: the side files of ``source_dir`` plus (when given) the weights.

    ``source_dir``: the run's HF model dir (``model.hf_path`` or the tiny model's ``init_model/``); every top-level
    non-weight file is copied (config.json, generation_config.json, tokenizer files, chat template).
    ``tensors``: ``(hf_name, full tensor)`` pairs in HF order, e.g. ``MegatronPolicy.named_hf_parameters()``
    (the streaming export of ``convert.live.iter_hf_tensors``: collective, so **every rank passes its stream** and
    every rank drains it; padding stripped, no ``lm_head.weight`` when tied, model dtype). The writer streams them
    into ``model.safetensors`` (shards + index above 5 GiB); peak host memory is one shard. ``None``: side files only.
    ``out`` must not exist (the writer creates it). Returns the written file names (writer), else [].
    """
    from megatron_scpo.convert.hf_io import copy_side_files, write_safetensors

    if not is_writer:
        for _ in tensors or ():  # take part in the TP gathers / PP broadcasts, keep nothing
            pass
        return []
    out.mkdir(parents=True)
    seen: set[torch.dtype] = set()

    def noting_dtype(stream: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        for name, t in stream:
            seen.add(t.dtype)
            yield name, t

    names = write_safetensors(noting_dtype(tensors), out) if tensors is not None else []
    copied = copy_side_files(source_dir, out)
    if len(seen) == 1:
        _set_config_dtype(out / "config.json", seen.pop())
    return names + copied


def _set_config_dtype(config_json: Path, dtype: torch.dtype) -> None:
    """config.json names the weights' dtype (``dtype``, transformers 5; ``torch_dtype``, 4.x), so ``dtype="auto"``
    loads a bf16 run's export as bf16 (the source config may say float32)."""
    if not config_json.is_file():
        return
    cfg = json.loads(config_json.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    if all(cfg.get(k) == name for k in keys):
        return
    cfg.update({k: name for k in keys})
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def hf_saver(policy: Any, source_dir: Path, rank: int, weights: bool) -> Callable[[Path], None]:
    """``save_hf(dir)`` for ``CheckpointManager.save``: the policy's HF copy (``weights``) or its config only."""
    def save(out: Path) -> None:
        export_hf(out, source_dir, policy.named_hf_parameters() if weights else None, is_writer=rank == 0)
    return save


class CheckpointManager:
    """Saves/loads trainer checkpoints under ``RUN_DIR/checkpoints``.

    ``save_model(dir)`` is a collective callback (every rank calls it with the same dir): the backend's
    model + optimizer save. Only rank 0 touches files of its own; ``barrier`` syncs ranks around it.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.barrier = barrier or (lambda: None)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        self.barrier()

    # ---- discovery -------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete step checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        out = [p for p in self.root.iterdir() if STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(out, key=lambda p: int(STEP_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """Newest complete checkpoint (step or stage snapshot): the ``latest`` pointer if valid, else a scan
        for the highest ``global_step`` among complete checkpoint dirs."""
        ptr = self.root / "latest"
        if ptr.is_file():
            cand = self.root / ptr.read_text().strip()
            if (cand / STATE_FILE).is_file():
                return cand
        if not self.root.is_dir():
            return None
        cands = [p for p in self.root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")
                 and (p / STATE_FILE).is_file()]
        if not cands:
            return None
        return max(cands, key=lambda p: (json.loads((p / STATE_FILE).read_text()).get("global_step", -1),
                                         p.stat().st_mtime))

    def snapshot(self, name: str) -> Path | None:
        p = self.root / name
        return p if (p / STATE_FILE).is_file() else None

    # ---- save ------------------------------------------------------------------------------------
    def save(self, global_step: int, state: dict[str, Any], save_model: Callable[[Path], None],
             snapshot: str | None = None, save_hf: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint ``step_{global_step}`` (or the named stage snapshot) atomically.

        ``save_model(dir)`` and ``save_hf(dir)`` (optional, e.g. ``hf_saver``) are collective: every rank calls
        them with ``<tmp>/model`` and ``<tmp>/hf``; both land inside the temp dir that is renamed at the end.
        """
        name = snapshot or f"step_{global_step:06d}"
        final = self.root / name
        tmp = self.root / f"{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        save_model(tmp / "model")
        if save_hf is not None:
            save_hf(tmp / HF_SUBDIR)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self.barrier()
        if self.rank == 0:
            write_json_atomic(tmp / STATE_FILE, {**state, "global_step": global_step})
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            ptr_tmp = self.root / "latest.tmp"
            ptr_tmp.write_text(name + "\n")
            os.replace(ptr_tmp, self.root / "latest")
            _fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for p in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():  # leftovers of crashed saves
            if p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------------
    def load(self, path: Path, load_model: Callable[[Path], None] | None = None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Read trainer state (and optionally model/optimizer via ``load_model``, and RNG) from ``path``."""
        state = json.loads((path / STATE_FILE).read_text())
        if load_model is not None:
            load_model(path / "model")
        if restore_rng:
            rng_file = path / f"rng_rank{self.rank}.pt"
            if not rng_file.is_file():
                rng_file = path / "rng_rank0.pt"
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state
