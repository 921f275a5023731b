"""Fidelity over seeds: run a config under several seed sets and print mean and sd per method.

    python benchmarks/seed_sweep.py                                   # configs/tiny_cpu.yaml, seeds 0 1 2
    python benchmarks/seed_sweep.py --config configs/compare_cpu.yaml --seeds 0 1 2
    python benchmarks/seed_sweep.py --aggregate-only --out runs/seeds/tiny_cpu   # re-read finished runs

Seed set ``i`` moves every source of randomness at once: the synthetic data (``data.synthetic.seed``, the
train/eval problems), the data order (``data.shuffle_seed``), the model initialization (``tiny_model.seed``),
the RL/SFT sampling (``rl.seed``) and the evaluation sampling (``eval.seed``). Seed set 0 keeps the config's
own values, so it reproduces the single-seed run. Each seed set is one ``scpo train`` subprocess (its own run
dir ``OUT/seed<i>``; an interrupted sweep resumes: finished seed sets are skipped, a killed one resumes from
its checkpoint).

The table gives, per run label (warm start, stage 1, each RL method), mean +- population sd over seed sets of
pass@1, mean tokens, tokens vs the same seed's warm start, critical-step tokens kept and redundant-step tokens
removed (``trainer/report.summarize``, computed per seed before averaging), and the per-seed values. It also
checks the issue-11 targets for SCPO against the warm start and the global length penalty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

COLUMNS = (("pass@1", "pass@1", 100.0), ("mean_tokens", "mean tokens", 1.0),
           ("token_reduction", "tokens vs warm start", -100.0), ("critical_kept", "critical kept", 100.0),
           ("redundant_removed", "redundant removed", 100.0))


def seed_overrides(i: int) -> list[str]:
    """Config overrides of seed set ``i`` (0 = the config's own seeds)."""
    if i == 0:
        return []
    return [f"data.synthetic.seed={1000 + i}", f"data.shuffle_seed={i}", f"tiny_model.seed={i}",
            f"rl.seed={1234 + 7919 * i}", f"eval.seed={4321 + 104729 * i}"]


def run_seed(config: str, run_dir: Path, i: int, extra: list[str]) -> None:
    """One ``scpo train`` subprocess; skipped when the run already wrote its report (finished)."""
    if (run_dir / "report.md").is_file():
        print(f"[seed_sweep] seed set {i}: {run_dir} is complete, skipped", flush=True)
        return
    cmd = [sys.executable, "-m", "megatron_scpo.cli", "train", config, "--run-dir", str(run_dir),
           *seed_overrides(i), *extra, "logging.progress=false"]
    print("[seed_sweep] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def collect(out: Path, seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """label -> one summarized eval row per seed set (relative columns against that seed's warm start)."""
    from megatron_scpo.trainer.report import load_evals, summarize

    per: dict[str, list[dict[str, Any]]] = {}
    for i in seeds:
        for row in summarize(load_evals([out / f"seed{i}"])):
            row["seed_set"] = i
            per.setdefault(row["label"], []).append(row)
    return per


def _stats(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def table(per: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mean +- sd per column, then the per-seed values."""
    head = ["run", "seeds"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rows in per.items():
        cells = [label, str(len(rows))]
        for key, _, scale in COLUMNS:
            vals = [float(r[key]) * scale for r in rows if r.get(key) is not None]
            if not vals:
                cells.append("-")
                continue
            m, sd = _stats(vals)
            each = " / ".join(f"{v:.1f}" for v in vals)
            cells.append(f"{m:.1f} +- {sd:.1f} ({each})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(per: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Issue-11 targets for SCPO, judged on the means over seed sets."""
    scpo = next((rows for lab, rows in per.items() if "scpo" in lab), None)
    base = per.get("warmstart")
    glp = next((rows for lab, rows in per.items() if "global_length_penalty" in lab), None)
    if scpo is None or base is None:
        return ["(no SCPO or warm-start evaluation: targets not checked)"]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.fmean(float(r[key]) for r in rows if r.get(key) is not None)

    out = [
        f"- tokens vs warm start: {-100 * mean(scpo, 'token_reduction'):+.1f}% (target <= -40%)",
        f"- pass@1 vs warm start: {100 * (mean(scpo, 'pass@1') - mean(base, 'pass@1')):+.1f} points (target >= -1)",
        f"- critical-step tokens kept: {100 * mean(scpo, 'critical_kept'):.1f}% (target >= 90%)",
        f"- redundant-step tokens removed: {100 * mean(scpo, 'redundant_removed'):.1f}% (target >= 70%)",
    ]
    if glp is not None:
        out.append(f"- vs global length penalty: pass@1 {100 * (mean(scpo, 'pass@1') - mean(glp, 'pass@1')):+.1f} "
                   f"points at {mean(scpo, 'mean_tokens'):.1f} vs {mean(glp, 'mean_tokens'):.1f} tokens "
                   "(target: higher accuracy at equal or fewer tokens)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="sweep dir (default runs/seeds/<config stem>)")
    p.add_argument("--aggregate-only", action="store_true", help="only read finished runs")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for every seed set")
    a = p.parse_intermixed_args(argv)
    out = Path(a.out or Path("runs") / "seeds" / Path(a.config).stem)
    if not a.aggregate_only:
        for i in a.seeds:
            run_seed(a.config, out / f"seed{i}", i, list(a.overrides))
    per = collect(out, a.seeds)
    text = "\n".join([f"# Seed sweep: {a.config}, seed sets {a.seeds}", "", table(per), "", "## Targets (SCPO)", "",
                      *targets(per), ""])
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text(text)
    (out / "seeds.json").write_text(json.dumps({k: [{c[0]: r.get(c[0]) for c in COLUMNS} | {"seed_set": r["seed_set"]}
                                                    for r in v] for k, v in per.items()}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
