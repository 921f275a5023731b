"""`scpo report RUN_DIR...`: compare evaluations of runs as a Markdown table and a PNG plot.

Reads every ``RUN_DIR/eval/*.json`` (written by evaluate.py). The first evaluation labelled
``warmstart`` (else the first one found; with several run dirs, the first given run's) is the baseline that the
token reduction, AE and the critical/redundant retention percentages are computed against. With several run
dirs every row is named ``<run dir name>/<label>``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from megatron_scpo.trainer.evaluate_math import ae_score
from megatron_scpo.trainer.metrics import PHASES, ROLLOUT_TOKENS_PER_S, read_metrics

ORDER = ("warmstart", "stage1")


def load_evals(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """All eval records of the given run dirs, stage order first (warmstart, stage1, then RL runs)."""
    out = []
    names = [Path(rd).name for rd in run_dirs]
    unique = len(set(names)) == len(names)
    for i, rd in enumerate(run_dirs):
        d = Path(rd) / "eval"
        if not d.is_dir():
            raise ValueError(f"{rd}: no eval/ directory (run `scpo train` or `scpo eval` first)")
        for p in sorted(d.glob("*.json")):
            rec = json.loads(p.read_text())
            rec.setdefault("label", p.stem)
            rec["stage_label"], rec["run_dir"], rec["run_index"] = rec["label"], str(rd), i
            if len(run_dirs) > 1:  # which run a row belongs to (its dir name, or the path when names repeat)
                rec["label"] = f"{names[i] if unique else rd}/{rec['stage_label']}"
            out.append(rec)
    if not out:
        raise ValueError(f"no evaluation results in {[str(r) for r in run_dirs]}")

    def key(r: dict[str, Any]) -> tuple[int, int, float, str]:
        lab = r["stage_label"]
        return (ORDER.index(lab) if lab in ORDER else len(ORDER), r["run_index"], float(r.get("created", 0.0)), lab)

    return sorted(out, key=key)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _signed_pct(reduction: float | None) -> str:
    """Token change vs the baseline as a signed percentage (-40.0% = 40% fewer tokens)."""
    if reduction is None:
        return "-"
    change = -100 * reduction
    return f"{'+' if change >= 0 else '-'}{abs(change):.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def summarize(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add baseline-relative columns (token reduction, AE, critical kept, redundant removed)."""
    base = next((e for e in evals if e.get("stage_label", e["label"]) == "warmstart"), evals[0])
    rows = []
    for e in evals:
        row = dict(e)
        bl, ba = base["mean_tokens"], base["pass@1"]
        row["token_reduction"] = (bl - e["mean_tokens"]) / bl if bl > 0 else None
        row["ae"] = ae_score(ba, e["pass@1"], bl, e["mean_tokens"])
        bc, br = base.get("critical_tokens"), base.get("redundant_tokens")
        c, r = e.get("critical_tokens"), e.get("redundant_tokens")
        row["critical_kept"] = c / bc if c is not None and bc else None
        row["redundant_removed"] = 1 - r / br if r is not None and br else None
        row["baseline"] = base["label"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    ks = sorted({k for r in rows for k in r.get("pass@k", {}) if k != "1"}, key=int)
    head = ["run", "pass@1"] + [f"pass@{k}" for k in ks] + [
        "mean tokens", "tokens vs base", "AE", "critical tok", "redundant tok", "critical kept", "redundant removed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], _pct(r["pass@1"])] + [_pct(r.get("pass@k", {}).get(k)) for k in ks] + [
            _num(r["mean_tokens"]), _signed_pct(r["token_reduction"]),
            _num(r["ae"], ".2f"), _num(r.get("critical_tokens")), _num(r.get("redundant_tokens")),
            _pct(r["critical_kept"]), _pct(r["redundant_removed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difficulty_table(rows: list[dict[str, Any]]) -> str:
    diffs = sorted({d for r in rows for d in r.get("per_difficulty", {})}, key=lambda d: int(d))
    if not diffs:
        return ""
    head = ["run"] + [f"d={d} acc / tok" for d in diffs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pd = r.get("per_difficulty", {})
        cells = [r["label"]] + [
            f"{_pct(pd[d]['pass@1'])} / {_num(pd[d]['mean_tokens'])}" if d in pd else "-" for d in diffs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_table(run_dir: Path) -> str:
    """Mean seconds per RL step and per phase, per method, from metrics.jsonl."""
    per: dict[str, list[dict]] = defaultdict(list)
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r["stage"].startswith("rl/"):
            per[r["stage"][3:]].append(r)
    if not per:
        return "(no RL steps logged)"
    mean = {m: {k: sum(r.get(f"time/{k}") or 0.0 for r in rs) / len(rs) for k in (*PHASES, "step")}
            for m, rs in per.items()}
    fastest = min(v["step"] for v in mean.values())
    head = ["method", "s/step", "vs fastest"] + [f"{p} %" for p in PHASES] + ["tokens/s (rollout)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, v in mean.items():
        tps = sum(r.get(ROLLOUT_TOKENS_PER_S) or 0.0 for r in per[m]) / len(per[m])
        cells = [m, f"{v['step']:.2f}", f"{v['step'] / fastest:.2f}x"] + [
            f"{100 * v[p] / v['step']:.0f}" for p in PHASES] + [f"{tps:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: mean tokens vs accuracy per run. Right: critical vs redundant tokens per run (stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        ax1.scatter(r["mean_tokens"], 100 * r["pass@1"], s=40)
        ax1.annotate(r["label"], (r["mean_tokens"], 100 * r["pass@1"]), textcoords="offset points", xytext=(4, 4),
                     fontsize=8)
    ax1.set_xlabel("mean response tokens")
    ax1.set_ylabel("pass@1 (%)")
    ax1.set_title("accuracy vs length")
    ax1.grid(alpha=0.3)
    labels = [r["label"] for r in rows]
    crit = [r.get("critical_tokens") or 0.0 for r in rows]
    red = [r.get("redundant_tokens") or 0.0 for r in rows]
    other = [max(0.0, r["mean_tokens"] - c - d) for r, c, d in zip(rows, crit, red)]
    x = range(len(rows))
    ax2.bar(x, crit, label="critical steps", color="tab:green")
    ax2.bar(x, red, bottom=crit, label="redundant steps", color="tab:red")
    ax2.bar(x, other, bottom=[c + d for c, d in zip(crit, red)], label="other (answer, delimiters)",
            color="tab:gray")
    ax2.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("tokens per response")
    ax2.set_title("where the tokens go")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> str:
    """Write ``report.md`` + ``report.png`` into ``out_dir``; returns the Markdown text."""
    rows = summarize(load_evals(run_dirs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Comparison", "", f"Baseline for relative columns: `{rows[0]['baseline']}`.", "",
          markdown_table(rows), ""]
    dt = difficulty_table(rows)
    if dt:
        md += ["## Per difficulty (number of operations)", "", dt, ""]
    md += ["![report](report.png)", ""]
    for rd in run_dirs:
        if (Path(rd) / "metrics.jsonl").is_file():
            md += [f"## Where RL step time goes ({rd})", "", phase_table(Path(rd)), ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    plot(rows, out / "report.png")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="run directories with eval/*.json")
    p.add_argument("--out", default=None, help="output dir (default: the first run dir)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scpo report", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    text = write_report(a.run_dirs, a.out or a.run_dirs[0])
    print(text)
    return 0
