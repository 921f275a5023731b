"""`scpo eval CONFIG (--hf DIR | --run-dir DIR [--checkpoint NAME])`: evaluate a model on a config's eval set.

``--hf``: a plain HF model dir served by the configured engine (evaluate.eval_hf, no Megatron). ``--run-dir``: a
run's checkpoint loaded into Megatron and synced to the engine (``evaluate_checkpoint``), as after each stage of
``scpo train``. This module sits above run.py and evaluate.py (it needs both), so neither imports the other back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from megatron_scpo.config import ConfigError, ExperimentConfig, load_config
from megatron_scpo.trainer.evaluate import eval_hf, evaluate
from megatron_scpo.trainer.run import build_runtime, preflight


def _check_checkpoint(run_dir: Path, checkpoint: str | None) -> None:
    """ConfigError (one line, listing what exists) for a run dir without complete checkpoints or an unknown
    ``--checkpoint`` name; reads only, creates nothing."""
    from megatron_scpo.trainer.checkpoint import complete_checkpoints

    root = run_dir / "checkpoints"
    names = [p.name for p in complete_checkpoints(root)]
    if not names:
        raise ConfigError(f"--run-dir {run_dir}: no complete checkpoint under {root} (is it a `scpo train` run dir?)")
    if checkpoint is not None and checkpoint not in names:
        raise ConfigError(f"--checkpoint {checkpoint!r}: not in {root}; it has {names}")


def evaluate_checkpoint(cfg: ExperimentConfig, run_dir: Path, checkpoint: str | None, label: str | None,
                        out: str | None) -> dict[str, Any] | None:
    """`scpo eval --run-dir`: load a checkpoint of a run into Megatron, sync to the engine, evaluate.

    ``checkpoint`` names a stage snapshot or a ``step_*`` dir (None: the latest); writes ``<out or run_dir>/eval/
    <label>.json`` and returns the result on rank 0 (None elsewhere). Raises ConfigError for a missing checkpoint.
    """
    _check_checkpoint(run_dir, checkpoint)  # before Megatron is imported or anything is written
    data = preflight(cfg)
    rt = build_runtime(cfg, run_dir)
    path = rt.ckpt.root / checkpoint if checkpoint else rt.ckpt.latest()  # checked complete above
    rt.ckpt.load(path, load_model=lambda d: rt.policy.load_shards(d, load_optimizer=False))
    rt.sync_weights()
    if out:
        rt.run_dir = Path(out)
    return evaluate(rt, data["eval"], label or f"eval_{path.name}")


def main(argv: list[str] | None = None) -> int:
    """`scpo eval`; bad input (config field, data file line/field, model dir) prints one ``error:`` line, exit 2."""
    p = argparse.ArgumentParser(prog="scpo eval", description=__doc__.splitlines()[0])
    p.add_argument("config", help="experiment YAML (data, eval and rollout sections are used)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF model dir (config + safetensors + tokenizer): no Megatron needed")
    src.add_argument("--run-dir", help="a training run dir; evaluates --checkpoint (default: latest)")
    p.add_argument("--checkpoint", default=None, help="checkpoint name under RUN_DIR/checkpoints")
    p.add_argument("--label", default=None, help="name of the eval/<label>.json written")
    p.add_argument("--out", default=None, help="where eval/<label>.json goes (default: run dir or cwd)")
    a = p.parse_intermixed_args(argv)

    from megatron_scpo.data.datasets import load_split

    try:
        cfg = load_config(a.config, a.overrides)
        if a.hf:
            records = load_split(cfg.data, "eval")[: cfg.eval.n_prompts]
            result = eval_hf(cfg, a.hf, records, a.label, a.out)
            print(json.dumps({k: v for k, v in result.items() if k != "example"}, indent=1))
            return 0
        evaluate_checkpoint(cfg, Path(a.run_dir), a.checkpoint, a.label, a.out)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, PromptTooLongError, ConversionError
        print(f"scpo eval: error: {e}", file=sys.stderr)
        return 2
    return 0
