"""Run-dir layout and the one checkpoint protocol (atomic step dirs holding backend shards, trainer state, RNG).

Layout of a run dir::

    RUN_DIR/config.yaml            resolved config of the run
    RUN_DIR/metrics.jsonl          one record per step (metrics.py)
    RUN_DIR/tb/                    TensorBoard
    RUN_DIR/eval/<label>.json      evaluation results (evaluate.py), read by the report
    RUN_DIR/checkpoints/step_000123/   complete checkpoints only (format ``CHECKPOINT_FORMAT``):
        model/                     the backend's shards, written into the dir it is given (backend/checkpoint.py):
                                   megatron dist checkpoint of model + optimizer, scpo_backend_meta.json
        hf/                        config.json, generation_config.json, tokenizer files of the run's model;
                                   with ``checkpoint.save_hf`` also model.safetensors (or shards + index):
                                   a complete HF model dir (``scpo eval --hf``, vLLM/SGLang, transformers)
        rng/rank{r}.pt             every RNG stream of rank r (backend/rng.py: python, numpy, torch, cuda,
                                   megatron's tracker, and the layout they belong to)
        trainer_state.json         stage, step counters, data position, method state, metrics count,
                                   ``global_step`` and ``checkpoint_format``; written last
    RUN_DIR/checkpoints/latest     name of the newest complete checkpoint (step or snapshot)
    RUN_DIR/checkpoints/<stage>/   stage-end snapshots (never pruned; comparisons start from them)

One protocol: a checkpoint is written into ``<name>.tmp`` (the backend's shards, the HF copy and the RNG files
inside it), ``trainer_state.json`` last, then every file is fsynced and the dir renamed (``atomic.replace_dir``),
then ``latest`` is replaced atomically. A crash at any point leaves either the previous or the new checkpoint,
never a half one that looks complete. The HF copy is exactly as atomic as the rest (the peers: verl's
``checkpoint.save_contents: [hf_model]``, slime's ``--save-hf``, OpenRLHF's ``--save_hf_ckpt``, which write it
beside the checkpoint). ``scpo convert mcore-to-hf --mcore RUN_DIR/checkpoints/<name>`` reads ``model/`` and
``hf/``'s config.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from megatron_scpo.atomic import TMP_SUFFIX, recover_replaced, replace_dir, write_json_atomic, write_text_atomic
from megatron_scpo.backend.checkpoint import CheckpointError
from megatron_scpo.backend.rng import rng_state, set_rng_state
from megatron_scpo.convert.checkpoint import HF_SUBDIR  # one name: the converter reads the config from there
from megatron_scpo.convert.checkpoint import TRAINER_MODEL_SUBDIR as MODEL_SUBDIR
from megatron_scpo.convert.checkpoint import TRAINER_STATE_FILE as STATE_FILE

STEP_RE = re.compile(r"^step_(\d{6,})$")
RNG_SUBDIR = "rng"
# 2: one protocol (no nested backend temp dir), one RNG file per rank in rng/ (was rng_rank{r}.pt + model/rng_states.pt)
CHECKPOINT_FORMAT = 2


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_SUBDIR / f"rank{rank}.pt"


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


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Every complete checkpoint dir under ``root`` (steps and stage snapshots; not the ``.tmp`` of a save in
    progress or crashed), by name. Reads only: `scpo eval` asks before anything is built."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.endswith(TMP_SUFFIX)
                   and (p / STATE_FILE).is_file()), key=lambda p: p.name)


class CheckpointManager:
    """Saves/loads trainer checkpoints under ``RUN_DIR/checkpoints`` (the module docstring has the protocol).

    ``save_model(dir)`` / ``load_model(dir)`` are collective callbacks (every rank calls them with the same dir),
    e.g. ``MegatronPolicy.save_shards`` / ``load_shards``: the backend writes or reads its shards in ``dir``
    and nothing else. Rank 0 does the directory work; ``barrier`` syncs ranks around it.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.barrier = barrier or (lambda: None)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            recover_replaced(self.root)  # a re-saved snapshot whose swap crashed between its two renames
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
        cands = complete_checkpoints(self.root)
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
        """Write checkpoint ``step_{global_step}`` (or the named stage snapshot) atomically; returns its path.

        ``save_model(dir)`` and ``save_hf(dir)`` (optional, e.g. ``hf_saver``) are collective: every rank calls
        them with ``<tmp>/model`` and ``<tmp>/hf`` (not yet existing); both land inside the temp dir renamed at
        the end. Every rank then saves its RNG streams to ``<tmp>/rng/rank{r}.pt``.
        """
        name = snapshot or f"step_{global_step:06d}"
        final = self.root / name
        tmp = self.root / f"{name}{TMP_SUFFIX}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RNG_SUBDIR).mkdir(parents=True)
        self.barrier()
        save_model(tmp / MODEL_SUBDIR)
        if save_hf is not None:
            save_hf(tmp / HF_SUBDIR)
        torch.save(rng_state(), _rng_file(tmp, self.rank))
        self.barrier()
        if self.rank == 0:
            write_json_atomic(tmp / STATE_FILE, {**state, "global_step": global_step,
                                                 "checkpoint_format": CHECKPOINT_FORMAT})
            replace_dir(tmp, final)
            write_text_atomic(self.root / "latest", name + "\n")
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for p in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():  # leftovers of crashed saves
            if p.name.endswith(TMP_SUFFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------------
    def load(self, path: Path, load_model: Callable[[Path], None] | None = None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Read trainer state from checkpoint ``path``, load the model via ``load_model(path / "model")`` (when
        given), then (``restore_rng``) restore this rank's RNG streams from its own file (``backend.rng.set_rng_state``:
        all of them under the saved layout; after a reshard the host streams). A rank the checkpoint has no file
        for (the run grew) keeps its freshly seeded streams: another rank's state would make ranks draw alike.
        Returns the trainer state with ``global_step`` (without ``checkpoint_format``).

        Raises CheckpointError (one line, naming the file) for a checkpoint of another format.
        """
        state_file = path / STATE_FILE
        state = json.loads(state_file.read_text())
        found = state.pop("checkpoint_format", 1)
        if found != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{state_file}: checkpoint_format {found} != {CHECKPOINT_FORMAT} (written by another "
                                  "megatron_scpo version; this one cannot resume it: start a new run dir)")
        if load_model is not None:
            load_model(path / MODEL_SUBDIR)
        if restore_rng:
            rng_file = _rng_file(path, self.rank)
            if rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=False))
        return state
