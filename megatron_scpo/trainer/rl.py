"""Stage 2: one RL step exactly as DESIGN.md section 2, and the loop around it.

rollout -> verify -> segment -> importance (SCPO) -> reward/advantage (algo registry) -> old log-probs
recomputed by the trainer (+ rollout log-probs for TIS, + reference log-probs for the k3 KL term when
algo.loss.kl_coef > 0, see reference.py) -> train_step through the backend (a TrainBatch and
loss.py's PolicyLoss, which runs scpo_kernels.policy_loss) -> weight sync via the streaming export -> post-sync check ->
metrics (+ checkpoint, driven by run.py).

Rollouts (rank 0 generates, every rank gets the broadcast result), grading and the rollout filters
are rollouts.py's ``collect_rollouts``. With ``rl.overlong_filter`` truncated samples leave the loss mask
(DAPO overlong filtering; metric ``rollout/overlong_filtered``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from megatron_scpo.backend.seam import LossFn, TrainBatch
from megatron_scpo.trainer.batching import dp_share, pad_batch, pad_response_tensors
from megatron_scpo.trainer.loss import PolicyLoss
from megatron_scpo.trainer.metrics import IMPORTANCE_MEAN, TRAIN_METRIC_NAMES, PhaseTimer
from megatron_scpo.trainer.rollouts import Rollouts, collect_rollouts, rollout_stats
from megatron_scpo.trainer.runtime import Runtime

if TYPE_CHECKING:
    from megatron_scpo.algo.registry import Method


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
            padded = pad_batch(chunk, [[] for _ in chunk], rt.pad_id)
            lp = rt.logprobs(padded, temperature=1.0, micro_batch_size=micro_batch)
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
    metrics = {IMPORTANCE_MEAN: float(flat.mean()) if flat.numel() else 0.0,
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


def train_on(rt: Runtime, batch: TrainBatch, loss_fn: LossFn, mini_batches: int, micro_batch_size: int,
             sample_mask: torch.Tensor | None = None) -> dict[str, float]:
    """``mini_batches`` optimizer steps of ``loss_fn`` over consecutive row slices of ``batch`` (the whole step's
    rows, every rank); metrics averaged over them, named by ``TRAIN_METRIC_NAMES``.

    With data parallelism each slice's rows are split over the DP ranks by ``batching.dp_share`` (equal
    counts balanced by tokens), and the backend all-reduces gradients and normalizes the loss over the global
    batch, so the split changes no number beyond float summation order. Micro-batches inside a rank are the
    backend's (``parallel.packed_sequences``, ``parallel.max_tokens_per_micro_batch``).

    ``sample_mask`` [B] bool (e.g. DAPO overlong filtering): rows outside it stay in the batch but leave
    the loss mask, so they add nothing to the loss numerator, its denominator (tokens for token-mean,
    sequences for seq-mean-token-mean) or the KL term. A mini-batch with no loss token left (on any rank:
    the decision reads the global batch, so every rank agrees) is not stepped and counts in
    ``train/empty_minibatches``: a step on a zero gradient would still move the weights through Adam's
    momentum and weight decay. When samples were dropped (aborts, dynamic sampling) and the batch has fewer
    than ``mini_batches * dp`` rows, it is cut into ``max(1, B // dp)`` mini-batches, and a slice with fewer
    rows than DP ranks is padded with fully masked copies of its first row.
    """
    B = batch.size
    dp, dp_rank = rt.policy.info.dp, rt.policy.info.dp_rank
    n_mb = min(mini_batches, max(1, B // dp))
    bounds = [round(i * B / n_mb) for i in range(n_mb + 1)]
    if sample_mask is not None:
        batch = replace(batch, loss_mask=batch.loss_mask & sample_mask.bool()[:, None])
    # Checked on the whole batch, identically on every rank: a bad row (NaN engine log-probs, say) checked only in
    # the backend would raise on the one DP rank holding it while the others wait in the step's all-reduce.
    batch.validate(tuple(loss_fn.requires))
    agg: dict[str, float] = {}
    skipped = empty = 0
    steps: list[dict[str, Any]] = []
    for k in range(n_mb):
        rows = list(range(bounds[k], bounds[k + 1]))
        if not bool(batch.loss_mask[rows].any()):
            empty += 1
            continue
        m = rt.train_step(dp_share(batch, rows, dp, dp_rank), loss_fn, micro_batch_size)
        skipped += int(bool(m.get("skipped", False)) or not math.isfinite(float(m.get("loss", 0.0))))
        steps.append(m)
    for m in steps:
        for key, v in m.items():
            if isinstance(v, (int, float)):
                key = TRAIN_METRIC_NAMES.get(key, key)
                agg[key] = agg.get(key, 0.0) + float(v) / len(steps)
    agg["train/skipped_updates"] = float(skipped)
    agg["train/empty_minibatches"] = float(empty)
    agg["train/mini_batches"] = float(len(steps))
    return agg


def rl_step(rt: Runtime, method: Method, records: Sequence[Any], step: int, seed: int,
            draw: Callable[[int], Sequence[Any]] | None = None) -> dict[str, Any]:
    """One full RL step on ``records`` (the step's prompts); returns the step's metrics.

    ``draw(n)`` gives the next ``n`` prompts of the run's data order; it is required with
    ``rl.dynamic_sampling`` (``collect_rollouts``) and unused otherwise. Collective: every rank calls it.
    That ``rl.mini_batches`` leave every data-parallel rank a sample is checked once (``run.check_rl_batch``).
    """
    cfg = rt.cfg
    timer = PhaseTimer()
    with timer.phase("rollout"):
        col = collect_rollouts(rt, method, records, seed, draw)
    r = col.rollouts
    prompt_ids = [str(rec.id) for rec in col.drawn]
    if r.size == 0:  # every group aborted or filtered: nothing to learn from, the weights stay as they are
        if rt.is_main:
            print(f"[rl] step {step}: no trainable group left ({col.metrics}); no update", flush=True)
        return {**col.metrics, **timer.metrics(), "train/num_tokens": 0.0, "weight_version": rt.weight_version,
                "data/prompt_ids": prompt_ids}
    segs = segment(rt, r)
    pos_before = dict(rt.policy.position_stats)
    padded = pad_batch(r.prompt_ids, r.response_ids, rt.pad_id)
    T = cfg.rollout.temperature
    with timer.phase("old_logprob"):
        old_lp = rt.logprobs(padded, temperature=T)
    importance = None
    imp_metrics: dict[str, float] = {}
    if method.needs_importance:
        with timer.phase("importance"):
            importance, imp_metrics = compute_importance(rt, r, segs)
    out = method.compute(grouped(r, segs, importance))
    adv = out.advantages
    sample_mask = ~torch.tensor(r.truncated, dtype=torch.bool) if cfg.rl.overlong_filter else None
    rollout_lp = padded.scatter(pad_response_tensors(r.rollout_logprobs))
    diff = (rollout_lp - old_lp).abs()[padded.loss_mask]
    loss_fn = PolicyLoss.from_config(cfg.algo.loss, cfg.algo.clip.dual_clip, temperature=T)
    ref_lp = None
    if loss_fn.kl_coef > 0:  # k3 KL to the frozen reference (the rl_start weights, reference.py)
        ref = rt.reference
        if ref is None:
            raise RuntimeError("algo.loss.kl_coef > 0 but no reference policy was set up (Runtime.reference)")
        with timer.phase("ref_logprob"):
            ref_lp = ref.logprobs(rt, padded, temperature=T)
    batch = padded.train_batch(
        advantages=padded.scatter(adv.to(torch.float32)), old_logprobs=old_lp.detach(),
        eps_low=out.eps_low.to(torch.float32), eps_high=out.eps_high.to(torch.float32), ref_logprobs=ref_lp,
        # truncated importance sampling (rollout vs trainer log-probs) only with algo.loss.tis_cap set
        rollout_logprobs=rollout_lp if loss_fn.tis_cap is not None else None)
    with timer.phase("train"):
        train_m = train_on(rt, batch, loss_fn, cfg.rl.mini_batches, cfg.rl.micro_batch_size, sample_mask=sample_mask)
    with timer.phase("sync"):
        sync_m = rt.sync_weights()
    metrics: dict[str, Any] = {}
    metrics.update(out.metrics)
    metrics.update(col.metrics)
    metrics["rollout/overlong_filtered"] = float(sum(r.truncated)) if cfg.rl.overlong_filter else 0.0
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
        n_mb = int(train_m.get("train/mini_batches", cfg.rl.mini_batches))
        what = [f"{name} in {round(train_m.get(key, 0.0) * n_mb)}/{n_mb} mini-batches"
                for key, name in (("train/nonfinite_loss", "non-finite loss"),
                                  ("train/nonfinite_grad_norm", "non-finite grad norm")) if train_m.get(key, 0.0) > 0]
        if train_m.get("train/nonfinite_loss", 0.0) > 0:
            metrics["nan_loss_skipped"] = 1.0
        if rt.is_main:
            print(f"[rl] step {step}: {', '.join(what) or 'non-finite loss'}: {skipped} optimizer step(s) skipped",
                  flush=True)
    n_tok = sum(padded.response_lens)
    pos = {k: v - pos_before.get(k, 0) for k, v in rt.policy.position_stats.items()}
    if pos.get("computed_positions"):  # every backend pass of the step (old/ref log-probs, importance, train)
        metrics["perf/padding_efficiency"] = pos["real_tokens"] / pos["computed_positions"]
        metrics["perf/padded_layout_efficiency"] = pos["real_tokens"] / max(pos["padded_positions"], 1)
    metrics.update(timer.metrics())
    metrics["perf/train_tokens_per_s"] = n_tok / max(timer.seconds.get("train", 0.0), 1e-9)
    metrics["weight_version"] = rt.weight_version
    metrics["data/prompt_ids"] = prompt_ids
    return metrics
