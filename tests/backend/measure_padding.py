"""Padding efficiency (real tokens / computed positions) on the embedded default's RL rollouts.

Not a test (pytest does not collect it): a measurement behind the numbers in docs/backend.md.

    python tests/backend/measure_padding.py CHECKPOINT_DIR [CHECKPOINT_DIR ...] [--steps N]

Each CHECKPOINT_DIR is a trainer checkpoint of ``configs/tiny_cpu.yaml`` (or a config with the same model, e.g.
``compare_cpu.yaml``: ``rl_start`` = the RL start, ``rl_scpo`` = after SCPO). World 1: builds the embedded
default's runtime, loads the weights, runs ``--steps`` SCPO RL steps (real rollouts through the local engine,
old-log-prob, importance and training passes on the packed default) and prints the steps' measured
``perf/padding_efficiency`` and ``perf/padded_layout_efficiency``. From the same rollouts' lengths it also
computes, with the backend's own micro-batch planning, what other layouts would compute (padded [B, S] rows;
packed under PP=2, where micro-batches share one row length; a token budget).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def layouts(lengths: list[int], mbs: int, mini_batches: int) -> dict[str, float]:
    """Efficiency of the training pass over the rows of one step for several layouts (world 1 / PP=2)."""
    from megatron_scpo.backend.packing import balanced_partition, token_budget_micro_batches

    n = len(lengths)
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    real = sum(lengths)
    out = {}
    padded = packed_pp = 0
    budget = {b: 0 for b in (512, 2048)}
    for k in range(mini_batches):
        rows = lengths[bounds[k]:bounds[k + 1]]
        s = max(rows)
        chunks = [rows[i:i + mbs] for i in range(0, len(rows), mbs)]
        padded += sum(len(c) * s for c in chunks)  # the trainer's [B, S] rows, S = mini-batch's longest
        parts = balanced_partition(rows, -(-len(rows) // 8), max_size=8)  # PP=2: 8 rows per micro-batch
        packed_pp += len(parts) * max(sum(rows[i] for i in p) for p in parts)
        for b in budget:
            parts = token_budget_micro_batches(rows, b, multiple_of=1)
            budget[b] += len(parts) * max(sum(rows[i] for i in p) for p in parts)  # if PP: one row length
    out["padded"] = real / padded
    out["packed (no PP)"] = 1.0
    out["packed PP=2, 8 rows/micro-batch"] = real / packed_pp
    for b, v in budget.items():
        out[f"packed PP=2, budget {b} tokens"] = real / v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--work", default="/tmp/measure_padding")
    args = ap.parse_args()
    from dist_utils import spawn

    spawn(_worker, world_size=1, args=(args.config, args.checkpoints, args.steps, args.work))


def _worker(rank: int, world: int, config: str, checkpoints: list[str], steps: int, work: str) -> None:
    from megatron_scpo.config import load_config
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.trainer import rl as rlmod
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    cfg = load_config(config, ["logging.stdout=false", "logging.tensorboard=false", "logging.progress=false"])
    rt = build_runtime(cfg, Path(work))
    it = PromptIterator(load_split(cfg.data, "train"), seed=0)
    method = method_for(cfg, "scpo")
    seen: list[list[int]] = []
    real_pad = rlmod.pad_batch

    def spy(prompts, responses, pad_id, multiple_of=1):
        if responses and any(len(r) for r in responses):
            seen.append([len(p) + len(r) for p, r in zip(prompts, responses)])
        return real_pad(prompts, responses, pad_id, multiple_of)

    rlmod.pad_batch = spy
    report = {}
    for ck in checkpoints:
        rt.policy.load_shards(Path(ck) / "model", load_optimizer=False)
        rt.sync_weights()
        for step in range(steps):
            seen.clear()
            m = rlmod.rl_step(rt, method, it.next_batch(cfg.rl.prompts_per_step), step=step, seed=100 + step)
            lengths = seen[0]
            row = {"measured packed (all passes)": m["perf/padding_efficiency"],
                   "measured padded-layout equivalent (all passes)": m["perf/padded_layout_efficiency"],
                   "length/mean": m["length/mean"], "rows": len(lengths), "tokens max": max(lengths),
                   **layouts(lengths, cfg.rl.micro_batch_size, cfg.rl.mini_batches)}
            report[f"{Path(ck).name} step {step}"] = row
            print(json.dumps({f"{Path(ck).name} step {step}": row}), flush=True)
    Path(work, "padding.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
