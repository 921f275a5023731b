"""Per-step metrics with stable names, written to stdout, JSONL, TensorBoard and (when configured) W&B.

Names are a contract with dashboards, the report and the resume test, so they live here in one place:

- ``time/rollout``, ``time/old_logprob``, ``time/importance``, ``time/train``, ``time/sync``, ``time/step``
- ``perf/tokens_per_s`` (generated tokens / rollout seconds), ``perf/train_tokens_per_s``
- ``reward/mean``, ``reward/std``, ... (method metrics pass through under their own names)
- ``acc/mean``, ``length/mean``, ``length/max``, ``length/p50``, ``length/p90``, ``length/truncated_frac``
- ``clip/frac_low``, ``clip/frac_high``, ``importance/*``, ``rollout_logprob_abs_diff``
- ``rollout/aborted``, ``rollout/dropped_groups``, ``rollout/filtered_groups``, ``rollout/draws``,
  ``rollout/groups`` (trainer/rollouts.py's filters), ``rollout/overlong_filtered`` (trainer/rl.py)
- ``train/skipped_updates``, ``train/empty_minibatches``, ``train/mini_batches``

Only rank 0 writes. Non-finite values are stored as ``null`` in JSONL (strict JSON) and counted in
``nonfinite_metrics`` so a NaN never disappears silently.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from megatron_scpo.atomic import write_text_atomic
from megatron_scpo.trainer.config import LoggingConfig

T = TypeVar("T")

PHASES = ("rollout", "old_logprob", "importance", "train", "sync")

# The names more than one module spells (producers, the stdout line, the report): one spelling each.
ACC_MEAN = "acc/mean"  # fraction of graded-correct samples (rollouts.rollout_stats, sft.rejection_sample)
LENGTH_MEAN = "length/mean"  # response tokens per sample (rollout_stats, rejection_sample, sft_train)
ROLLOUT_TOKENS_PER_S = "perf/tokens_per_s"  # generated tokens / rollout seconds (rollout_stats; report.py)
IMPORTANCE_MEAN = "importance/mean"  # mean step importance of the scored responses (rl.compute_importance)
# backend train_step metric -> stable name (rl.train_on, sft.sft_train); unlisted keys keep their name
TRAIN_METRIC_NAMES = {"clip_frac_low": "clip/frac_low", "clip_frac_high": "clip/frac_high",
                      "num_tokens": "train/num_tokens", "skipped": "train/skipped", "kl": "kl/mean",
                      "nonfinite_loss": "train/nonfinite_loss", "nonfinite_grad_norm": "train/nonfinite_grad_norm"}
# Names the trainer computes from the rollouts in every RL step; a method's own metrics (algo registry's
# MethodOutput.metrics, merged first in rl.rl_step) must not mint them, or one of two values would silently win.
TRAINER_ROLLOUT_METRICS = frozenset({
    ACC_MEAN, LENGTH_MEAN, "length/max", "length/p50", "length/p90", "length/truncated_frac", ROLLOUT_TOKENS_PER_S,
    "perf/samples", IMPORTANCE_MEAN, "importance/scored_sequences", "importance/responses",
})
STDOUT_KEYS = (
    "reward/mean", ACC_MEAN, LENGTH_MEAN, "clip/frac_low", "clip/frac_high", "loss",
    "rollout_logprob_abs_diff", "time/step",
)


class PhaseTimer:
    """Accumulates wall time per phase; ``metrics()`` gives ``time/<phase>`` for every known phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def metrics(self) -> dict[str, float]:
        out = {f"time/{p}": self.seconds.get(p, 0.0) for p in PHASES}
        out.update({f"time/{p}": s for p, s in self.seconds.items()})
        out["time/step"] = time.perf_counter() - self._t0
        return out


def clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """Tensors/numpy scalars -> float; non-finite -> None (strict JSON)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MetricsLogger:
    """One record per step: ``{"stage", "step", **metrics}`` to every enabled sink (rank 0 only)."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, rank: int = 0, config_dict: dict | None = None):
        self.cfg = cfg
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb: dict[str, Any] = {}
        self._wandb = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("logging.wandb_project is set but wandb is not installed (pip install wandb)") from e
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(self.run_dir), config=config_dict,
                                     resume="allow", id=self._wandb_id())

    def _wandb_id(self) -> str:
        """Stable W&B run id stored in the run dir, so a resumed run continues the same W&B run."""
        p = self.run_dir / "wandb_id"
        if not p.exists():
            p.write_text(os.urandom(6).hex())
        return p.read_text().strip()

    def num_records(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def truncate(self, n_records: int) -> None:
        """Drop records written after the checkpoint we resume from (they will be produced again)."""
        if self.rank != 0 or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()][:n_records]
        write_text_atomic(self.path, "".join(line + "\n" for line in lines))

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        rec = clean(metrics)
        bad = [k for k, v in rec.items() if v is None and metrics.get(k) is not None]
        if bad:
            rec["nonfinite_metrics"] = len(bad)
        record = {"stage": stage, "step": step, **rec}
        if self.rank != 0:
            return record
        if self.cfg.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        if self.cfg.stdout:
            shown = " | ".join(f"{k} {_fmt(rec[k])}" for k in STDOUT_KEYS if k in rec)
            extra = f" | NONFINITE {bad}" if bad else ""
            print(f"[{stage}] step {step} | {shown}{extra}", file=sys.stdout, flush=True)
        if self.cfg.tensorboard:
            writer = self._writer(stage)
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, v, step)
            writer.flush()
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))})
        return record

    def _writer(self, stage: str) -> Any:
        if stage not in self._tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb[stage] = SummaryWriter(log_dir=str(self.run_dir / "tb" / stage.replace("/", "_")))
        return self._tb[stage]

    def close(self) -> None:
        for w in self._tb.values():
            w.close()
        self._tb.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl back (for the report and tests)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on stderr for long loops; a plain iterator when disabled or tqdm is missing."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
