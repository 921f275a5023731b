"""Stage 2: one RL step exactly as DESIGN.md section 2, and the loop around it.

rollout -> verify -> segment -> importance (SCPO) -> reward/advantage (algo registry) -> old log-probs
recomputed by the trainer (+ rollout log-probs for TIS, + reference log-probs for the k3 KL term when
algo.loss.kl_coef > 0, see reference.py) -> train_step through the backend (the loss path
is the kernels' policy_loss dispatch) -> weight sync via the streaming export -> post-sync check ->
metrics (+ checkpoint, driven by run.py).

Rollouts happen on rank 0 and are broadcast (runtime.py explains why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_scpo.trainer.batching import PackedBatch, pack, pad_response_tensors
from megatron_scpo.trainer.metrics import PhaseTimer
from megatron_scpo.trainer.runtime import Runtime, broadcast_object


@dataclass
class Rollouts:
    """One step's samples, flattened (B = prompts x n), identical on every rank after the broadcast."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]]
    texts: list[str]
    truncated: list[bool]
    correct: list[bool]
    group_ids: list[int]
    prompt_keys: list[str]
    golds: list[str]
    problems: list[str]
    difficulty: list[int | None]
    offsets: list[list[tuple[int, int]]]

    @property
    def size(self) -> int:
        return len(self.response_ids)


def token_offsets(tokenizer: Any, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character span of every generated token inside ``text`` (the engine's decode of ``ids``).

    Byte-level BPE decodes token by token into the same string for ASCII text, so cumulative piece lengths
    are exact; special tokens (EOS) decode to "" and get an empty span at the end. If the pieces do not
    concatenate to ``text`` (multi-byte characters split across tokens), fall back to prefix decoding.
    """
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
    if "".join(pieces) == text:
        out, pos = [], 0
        for p in pieces:
            out.append((pos, pos + len(p)))
            pos += len(p)
        return out
    out, prev = [], 0
    for i in range(len(ids)):
        cur = min(len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)), len(text))
        out.append((min(prev, cur), cur))
        prev = cur
    return out


def generate_rollouts(rt: Runtime, records: Sequence[Any], prompt_texts: Sequence[str], n: int,
                      params: Any) -> Rollouts:
    """Rank 0 samples ``n`` responses per prompt and verifies them; every rank gets the same Rollouts."""
    from megatron_scpo.data.answers import is_correct

    result = None
    if rt.is_main:
        prompts = [rt.encode_prompt(t) for t in prompt_texts]
        out = rt.engine.generate(prompts, n, params)
        r = Rollouts([], [], [], [], [], [], [], [], [], [], [], [])
        for gi, (rec, samples) in enumerate(zip(records, out)):
            for s in samples:
                r.prompt_ids.append(list(s.prompt_ids))
                r.response_ids.append(list(s.token_ids))
                r.rollout_logprobs.append(list(s.logprobs))
                r.texts.append(s.text)
                r.truncated.append(s.finish_reason == "length")
                r.correct.append(bool(is_correct(s.text, rec.answer)))
                r.group_ids.append(gi)
                r.prompt_keys.append(str(rec.id))
                r.golds.append(str(rec.answer))
                r.problems.append(rec.problem)
                r.difficulty.append((rec.meta or {}).get("difficulty"))
                r.offsets.append(token_offsets(rt.tokenizer, s.token_ids, s.text))
        result = r
    return broadcast_object(result)


def segment(rt: Runtime, r: Rollouts) -> list[Any]:
    """Per-sample Segmentation (step ids over response tokens) with the configured delimiter."""
    from megatron_scpo.algo.steps import segment_steps

    return [segment_steps(text, offs, rt.cfg.algo.segmentation) for text, offs in zip(r.texts, r.offsets)]


def make_scorer(rt: Runtime, micro_batch: int) -> Any:
    """Teacher-forced scorer for the importance estimator: sum of log-probs at the given positions.

    Collective: every rank calls it with the same sequences (they were broadcast), Megatron does the forward.
    """

    def scorer(seqs: list[list[int]], positions: list[list[int]]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(seqs), micro_batch):
            chunk = seqs[i:i + micro_batch]
            packed = pack(chunk, [[] for _ in chunk], rt.pad_id)
            lp = rt.logprobs(packed, temperature=1.0, micro_batch_size=micro_batch)
            for j, pos in enumerate(positions[i:i + micro_batch]):
                out.append(float(lp[j, torch.as_tensor(pos, dtype=torch.long)].sum()) if pos else 0.0)
        return out

    return scorer


def compute_importance(rt: Runtime, r: Rollouts, segs: list[Any]) -> tuple[list[torch.Tensor | None], dict]:
    """SCPO importance per correct sample (None for wrong ones), scored with the current (old) policy."""
    from megatron_scpo.algo.importance import ImportanceItem, estimate_importance

    icfg = rt.cfg.algo.importance
    enc = rt.tokenizer.encode
    forcing = enc(icfg.forcing_suffix, add_special_tokens=False)
    idx = [i for i in range(r.size) if r.correct[i] and segs[i].num_steps > 0]
    items = [ImportanceItem(r.prompt_ids[i], r.response_ids[i], segs[i].step_ids,
                            enc(r.golds[i] + icfg.answer_closing, add_special_tokens=False), segs[i].answer_step)
             for i in idx]
    scorer = make_scorer(rt, rt.cfg.rl.importance_micro_batch)
    n_seq = [0]

    def counting(seqs: list[list[int]], pos: list[list[int]]) -> list[float]:
        n_seq[0] += len(seqs)
        return scorer(seqs, pos)

    weights = estimate_importance(items, forcing, counting, icfg) if items else []
    out: list[torch.Tensor | None] = [None] * r.size
    for i, w in zip(idx, weights):
        out[i] = w
    flat = torch.cat(weights) if weights else torch.zeros(0)
    metrics = {"importance/mean": float(flat.mean()) if flat.numel() else 0.0,
               "importance/scored_sequences": float(n_seq[0]), "importance/responses": float(len(items))}
    return out, metrics


def grouped(r: Rollouts, segs: list[Any], importance: list[torch.Tensor | None] | None) -> Any:
    from megatron_scpo.algo.registry import GroupedRollouts
    from megatron_scpo.algo.steps import stack_step_ids

    T = max((len(x) for x in r.response_ids), default=0)
    step_ids = stack_step_ids([s.step_ids for s in segs], T)
    return GroupedRollouts(
        group_ids=torch.tensor(r.group_ids, dtype=torch.long),
        correct=torch.tensor(r.correct, dtype=torch.bool),
        response_lengths=torch.tensor([len(x) for x in r.response_ids], dtype=torch.long),
        step_ids=step_ids,
        response_mask=step_ids >= 0,
        truncated=torch.tensor(r.truncated, dtype=torch.bool),
        prompt_keys=list(r.prompt_keys),
        step_importance=importance,
    )


def synthetic_diagnostics(r: Rollouts, segs: list[Any], importance: list[torch.Tensor | None] | None
                          ) -> dict[str, float]:
    """Synthetic task only: tokens in critical/redundant steps, and the importance each kind received.

    A step's kind is the majority kind of its tokens (data.synthetic.token_kinds). If the estimator works,
    ``importance/critical_mean`` sits well above ``importance/redundant_mean``.
    """
    from megatron_scpo.data.synthetic import token_kinds

    crit = red = 0
    by_kind: dict[str, list[float]] = {"critical": [], "redundant": []}
    for i in range(r.size):
        kinds = token_kinds(r.problems[i], r.texts[i], r.offsets[i])
        crit += kinds.count("critical")
        red += kinds.count("redundant")
        w = importance[i] if importance is not None else None
        if w is None:
            continue
        ids = segs[i].step_ids.tolist()
        for k in range(min(int(w.numel()), segs[i].num_steps)):
            ks = [kinds[t] for t, sid in enumerate(ids) if sid == k and kinds[t] in by_kind]
            if ks and k != segs[i].answer_step:
                by_kind[max(set(ks), key=ks.count)].append(float(w[k]))
    out = {"tokens/critical_mean": crit / max(1, r.size), "tokens/redundant_mean": red / max(1, r.size)}
    for kind, vals in by_kind.items():
        if vals:
            out[f"importance/{kind}_mean"] = sum(vals) / len(vals)
    return out


def rollout_stats(r: Rollouts, rollout_seconds: float) -> dict[str, float]:
    lens = torch.tensor([len(x) for x in r.response_ids], dtype=torch.float64)
    q = torch.quantile(lens, torch.tensor([0.5, 0.9], dtype=torch.float64)) if lens.numel() else torch.zeros(2)
    return {
        "length/mean": float(lens.mean()),
        "length/max": float(lens.max()),
        "length/p50": float(q[0]),
        "length/p90": float(q[1]),
        "length/truncated_frac": float(sum(r.truncated) / max(1, r.size)),
        "acc/mean": float(sum(r.correct) / max(1, r.size)),
        "perf/tokens_per_s": float(lens.sum()) / max(rollout_seconds, 1e-9),
        "perf/samples": float(r.size),
    }


# backend metric -> stable metric name
TRAIN_METRIC_NAMES = {"clip_frac_low": "clip/frac_low", "clip_frac_high": "clip/frac_high", "grad_norm": "grad_norm",
                      "num_tokens": "train/num_tokens", "skipped": "train/skipped", "kl": "kl/mean",
                      "nonfinite_loss": "train/nonfinite_loss", "nonfinite_grad_norm": "train/nonfinite_grad_norm"}


def train_on(rt: Runtime, packed: PackedBatch, tensors: dict[str, torch.Tensor], loss: str,
             loss_kwargs: dict[str, Any], mini_batches: int, micro_batch_size: int) -> dict[str, float]:
    """``mini_batches`` optimizer steps over consecutive slices of the batch; metrics averaged.

    With data parallelism each DP rank trains on every dp-th row of the slice (the backend all-reduces
    gradients and normalizes the loss over the global token count).
    """
    B = packed.input_ids.shape[0]
    info = getattr(rt.policy, "info", None)
    dp, dp_rank = (info.dp, info.dp_rank) if info is not None else (1, 0)
    bounds = [round(i * B / mini_batches) for i in range(mini_batches + 1)]
    agg: dict[str, float] = {}
    skipped = 0
    for k in range(mini_batches):
        idx = list(range(bounds[k], bounds[k + 1]))[dp_rank::dp]
        if len(range(bounds[k], bounds[k + 1])) < dp:
            raise ValueError(f"mini-batch {k} has {bounds[k + 1] - bounds[k]} samples for {dp} data-parallel "
                             "ranks: raise rl.prompts_per_step or lower rl.mini_batches")
        sub = packed.select(idx)
        s = sub.input_ids.shape[1]
        batch = {"input_ids": sub.input_ids, "attention_mask": sub.attention_mask, "loss_mask": sub.loss_mask}
        for name, t in tensors.items():
            batch[name] = t[idx] if t.dim() == 1 else t[idx, :s]
        m = rt.train_step(batch, loss, loss_kwargs, micro_batch_size)
        skipped += int(bool(m.get("skipped", False)) or not math.isfinite(float(m.get("loss", 0.0))))
        for key, v in m.items():
            if isinstance(v, (int, float)):
                key = TRAIN_METRIC_NAMES.get(key, key)
                agg[key] = agg.get(key, 0.0) + float(v) / mini_batches
    agg["train/skipped_updates"] = float(skipped)
    return agg


def sampling_params(rt: Runtime, temperature: float, seed: int) -> Any:
    """Rollout sampling settings; EOS always stops. The seed is a function of the step (exact resume)."""
    from megatron_scpo.rollout.base import SamplingParams

    ro = rt.cfg.rollout
    return SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                          stop=list(ro.stop), stop_token_ids=sorted({rt.eos_id, *ro.stop_token_ids}), seed=seed)


def rl_step(rt: Runtime, method: Any, records: Sequence[Any], step: int, seed: int) -> dict[str, Any]:
    """One full RL step on ``records`` (the step's prompts); returns the step's metrics."""
    from megatron_scpo.data.templates import render_prompt

    cfg = rt.cfg
    timer = PhaseTimer()
    texts = [method.prepare_prompt(render_prompt(rec.problem, cfg.data.template, rt.tokenizer), str(rec.id))
             for rec in records]
    params = sampling_params(rt, cfg.rollout.temperature, seed)
    with timer.phase("rollout"):
        r = generate_rollouts(rt, records, texts, cfg.rollout.n_samples, params)
    segs = segment(rt, r)
    packed = pack(r.prompt_ids, r.response_ids, rt.pad_id)
    T = cfg.rollout.temperature
    with timer.phase("old_logprob"):
        old_lp = rt.logprobs(packed, temperature=T)
    importance = None
    imp_metrics: dict[str, float] = {}
    if method.needs_importance:
        with timer.phase("importance"):
            importance, imp_metrics = compute_importance(rt, r, segs)
    out = method.compute(grouped(r, segs, importance))
    adv = out.advantages
    if cfg.rl.overlong_reward == "zero_advantage":
        adv = torch.where(torch.tensor(r.truncated)[:, None], torch.zeros_like(adv), adv)
    rollout_lp = packed.scatter(pad_response_tensors(r.rollout_logprobs))
    diff = (rollout_lp - old_lp).abs()[packed.loss_mask]
    tensors = {
        "advantages": packed.scatter(adv.to(torch.float32)),
        "old_logprobs": old_lp.detach(),
        "eps_low": out.eps_low.to(torch.float32),
        "eps_high": out.eps_high.to(torch.float32),
    }
    loss_kwargs: dict[str, Any] = {"temperature": T, "agg": cfg.algo.loss.agg, "norm_length": cfg.algo.loss.norm_length,
                                   "dual_clip": cfg.algo.clip.dual_clip}
    if cfg.algo.loss.kl_coef > 0:  # k3 KL to the frozen reference (the rl_start weights, reference.py)
        ref = rt.extra.get("reference")
        if ref is None:
            raise RuntimeError("algo.loss.kl_coef > 0 but no reference policy was set up (rt.extra['reference'])")
        with timer.phase("ref_logprob"):
            tensors["ref_logprobs"] = ref.logprobs(rt, packed, temperature=T)
        loss_kwargs["kl_coef"] = cfg.algo.loss.kl_coef
    if cfg.algo.loss.tis_cap is not None:  # truncated importance sampling: rollout vs trainer log-probs
        tensors["rollout_logprobs"] = rollout_lp
        loss_kwargs["tis_cap"] = cfg.algo.loss.tis_cap
    with timer.phase("train"):
        train_m = train_on(rt, packed, tensors, "policy", loss_kwargs, cfg.rl.mini_batches, cfg.rl.micro_batch_size)
    with timer.phase("sync"):
        sync_m = rt.sync_weights()
    metrics: dict[str, Any] = {}
    metrics.update(out.metrics)
    metrics.update(imp_metrics)
    metrics.update(rollout_stats(r, timer.seconds.get("rollout", 0.0)))
    if cfg.data.source == "synthetic":
        metrics.update(synthetic_diagnostics(r, segs, importance))
    metrics.update(train_m)
    metrics["train_rollout_logprob_abs_diff"] = float(diff.mean()) if diff.numel() else 0.0
    for k, v in sync_m.items():
        metrics[k] = v
    skipped = int(train_m.get("train/skipped_updates", 0.0))
    if skipped:
        n_mb = cfg.rl.mini_batches
        what = [f"{name} in {round(train_m.get(key, 0.0) * n_mb)}/{n_mb} mini-batches"
                for key, name in (("train/nonfinite_loss", "non-finite loss"),
                                  ("train/nonfinite_grad_norm", "non-finite grad norm")) if train_m.get(key, 0.0) > 0]
        if train_m.get("train/nonfinite_loss", 0.0) > 0:
            metrics["nan_loss_skipped"] = 1.0
        if rt.is_main:
            print(f"[rl] step {step}: {', '.join(what) or 'non-finite loss'}: {skipped} optimizer step(s) skipped",
                  flush=True)
    n_tok = sum(packed.response_lens)
    metrics.update(timer.metrics())
    metrics["perf/train_tokens_per_s"] = n_tok / max(timer.seconds.get("train", 0.0), 1e-9)
    metrics["weight_version"] = rt.weight_version
    metrics["data/prompt_ids"] = [str(rec.id) for rec in records]
    return metrics
