"""Evaluation: pass@1, pass@k, mean tokens, AE, per difficulty, and critical vs redundant tokens.

``evaluate(rt, records, label)`` runs inside a training run (after each stage) on the rollout engine
of rank 0 and writes ``RUN_DIR/eval/<label>.json``; ``eval_hf`` serves a plain HF model dir without Megatron.
The ``scpo eval`` command line (a run's checkpoint or ``--hf``) is eval_cli.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_scpo.trainer.evaluate_math import ae_score, aggregate


def score_samples(records: Sequence[Any], outputs: Sequence[Sequence[Any]], tokenizer: Any,
                  synthetic_task: bool, grading: Any = None, prompts: Sequence[str] | None = None
                  ) -> list[dict[str, Any]]:
    """Engine outputs -> per-sample records for ``aggregate`` (correctness, tokens, step-kind tokens).

    Correctness is data/verify.py's ``grading`` (default ``Grading()``: truncated or unclosed-think responses
    are wrong) with each record's rendered prompt text from ``prompts``.
    """
    from megatron_scpo.data.verify import Grading
    from megatron_scpo.trainer.rollouts import token_offsets

    grading = grading or Grading()
    out = []
    for j, (rec, samples) in enumerate(zip(records, outputs)):
        for s in samples:
            ok = grading.grade(s.text, str(rec.answer), s.finish_reason, prompts[j] if prompts else "")
            row: dict[str, Any] = {"prompt_id": rec.id, "correct": ok,
                                   "n_tokens": len(s.token_ids), "truncated": s.finish_reason == "length"}
            diff = (rec.meta or {}).get("difficulty")
            if diff is not None:
                row["difficulty"] = diff
            if synthetic_task:
                from megatron_scpo.data.synthetic import critical_redundant_tokens

                crit, red = critical_redundant_tokens(rec.problem, s.text, token_offsets(tokenizer, s.token_ids,
                                                                                         s.text))
                row["critical"], row["redundant"] = crit, red
            out.append(row)
    return out


def encode_eval_prompts(tokenizer: Any, cfg: Any, records: Sequence[Any]) -> tuple[list[str], list[list[int]]]:
    """(rendered texts, prompt ids) of ``records``: ``templates.encode_rendered``, the one encoding rollouts use.

    Raises PromptTooLongError naming the record id when a prompt exceeds ``data.max_prompt_tokens``.
    """
    from megatron_scpo.data.templates import encode_rendered, render_prompt

    texts = [render_prompt(r.problem, cfg.data.template, tokenizer) for r in records]
    ids = [encode_rendered(t, cfg.data.template, tokenizer, max_tokens=cfg.data.max_prompt_tokens, name=r.id)
           for t, r in zip(texts, records)]
    return texts, ids


def run_eval(engine: Any, tokenizer: Any, cfg: Any, records: Sequence[Any],
             encoded: tuple[list[str], list[list[int]]] | None = None) -> dict[str, Any]:
    """Generate ``eval.n_samples`` per record with the eval sampling settings and aggregate.

    Prompts come from ``encode_eval_prompts`` (the ids training rollouts use), whichever engine serves them;
    ``encoded`` is its result when the caller already encoded ``records`` (eval_hf checks lengths first).
    """
    from megatron_scpo.data.verify import Grading
    from megatron_scpo.rollout.base import SamplingParams

    e = cfg.eval
    params = SamplingParams(max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens, temperature=e.temperature,
                            top_p=e.top_p, stop_token_ids=[int(tokenizer.eos_token_id)], seed=e.seed,
                            greedy=e.greedy)
    texts, prompts = encoded if encoded is not None else encode_eval_prompts(tokenizer, cfg, records)
    outputs = engine.generate(prompts, e.n_samples, params)
    rows = score_samples(records, outputs, tokenizer, cfg.data.source == "synthetic", Grading.from_config(cfg), texts)
    result = aggregate(rows, e.pass_k)
    example = outputs[0][0]
    result["example"] = {"problem": records[0].problem, "answer": records[0].answer, "response": example.text}
    return result


def evaluate(rt: Any, records: Sequence[Any], label: str, baseline: dict[str, Any] | None = None) -> dict | None:
    """Evaluate the engine's current weights on rank 0; writes ``eval/<label>.json``. None on other ranks."""
    if not rt.is_main:
        return None
    result = run_eval(rt.engine, rt.tokenizer, rt.cfg, records[: rt.cfg.eval.n_prompts])
    result["label"] = label
    result["created"] = time.time()
    if baseline is not None:
        result["ae_vs_" + baseline["label"]] = ae_score(baseline["pass@1"], result["pass@1"],
                                                        baseline["mean_tokens"], result["mean_tokens"])
    path = write_result(rt.run_dir, result)
    crit = result.get("critical_tokens")
    extra = f" critical {crit:.1f} redundant {result['redundant_tokens']:.1f}" if crit is not None else ""
    print(f"[eval {label}] pass@1 {100 * result['pass@1']:.1f}% mean tokens {result['mean_tokens']:.1f}{extra}"
          f" -> {path}", flush=True)
    return result


def write_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    """``<out_dir>/eval/<label>.json`` (the file `scpo report` reads); returns its path."""
    d = Path(out_dir) / "eval"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{result['label']}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def load_eval(run_dir: str | Path, label: str) -> dict[str, Any] | None:
    p = Path(run_dir) / "eval" / f"{label}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def eval_hf(cfg: Any, hf_dir: str | Path, records: Sequence[Any], label: str | None, out: str | None) -> dict:
    """`scpo eval --hf DIR`: the engine ``rollout.engine`` selects (``rollout.build_engine``, as in training) serves
    ``DIR``; prompts go through the one encoding. Writes ``<out>/eval/<label>.json`` and returns the result.

    Raises ValueError (one line, naming the dir) for a missing config or tokenizer, PromptTooLongError before
    any engine starts."""
    from megatron_scpo.data.tokenizer import load_tokenizer
    from megatron_scpo.rollout import build_engine

    if not (Path(hf_dir) / "config.json").is_file():
        raise ValueError(f"--hf: {Path(hf_dir) / 'config.json'} not found (give an HF model dir)")
    try:
        tok = load_tokenizer(hf_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--hf: cannot load a tokenizer from {hf_dir}: {e}") from None
    encoded = encode_eval_prompts(tok, cfg, records)  # an overlong prompt fails before an engine starts
    engine = build_engine(cfg.rollout, Path(hf_dir), tok)
    try:
        result = run_eval(engine, tok, cfg, records, encoded)
    finally:
        engine.shutdown()
    result["label"] = label or Path(hf_dir).name
    result["engine"] = cfg.rollout.engine
    print(f"[eval {result['label']}] -> {write_result(out or '.', result)}", file=sys.stderr, flush=True)
    return result
