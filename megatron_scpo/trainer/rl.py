"""Stage 2: one RL step exactly as DESIGN.md section 2, and the loop around it.

rollout -> verify -> segment -> importance (SCPO) -> reward/advantage (algo registry) -> old log-probs
recomputed by the trainer (+ rollout log-probs for TIS, + reference log-probs for the k3 KL term when
algo.loss.kl_coef > 0, see reference.py) -> train_step through the backend (the loss path
is the kernels' policy_loss dispatch) -> weight sync via the streaming export -> post-sync check ->
metrics (+ checkpoint, driven by run.py).

Rollouts happen on rank 0 and are broadcast (runtime.py explains why).

Before rewards (``collect_rollouts``): every sample is graded by data/verify.py (truncated or unclosed
responses are wrong unless ``rl.truncated_grading: grade``); samples the engine aborted are dropped and
their group shrinks (a group with fewer than 2 samples left is dropped: it has no baseline); with
``rl.dynamic_sampling`` groups whose correctness is all equal are filtered and more prompts are drawn.
With ``rl.overlong_filter`` truncated samples leave the loss mask (DAPO overlong filtering).
Metrics of these filters: ``rollout/aborted``, ``rollout/dropped_groups``, ``rollout/filtered_groups``,
``rollout/draws``, ``rollout/groups``, ``rollout/overlong_filtered``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from megatron_scpo.backend.packing import balanced_partition
from megatron_scpo.trainer.batching import PaddedBatch, pad_batch, pad_response_tensors
from megatron_scpo.trainer.metrics import PhaseTimer
from megatron_scpo.trainer.runtime import Runtime, broadcast_object


@dataclass
class Rollouts:
    """One step's samples, flattened (B = prompts x n), identical on every rank after the broadcast.

    Every field is a list with one entry per sample; ``group_ids`` index the step's prompts (0..G-1).
    ``correct`` is data.verify's grade; ``truncated`` is finish reason ``length``.
    """

    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    prompt_keys: list[str] = field(default_factory=list)
    golds: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    difficulty: list[int | None] = field(default_factory=list)
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.response_ids)

    @property
    def num_groups(self) -> int:
        return len(set(self.group_ids))

    def select(self, idx: Sequence[int], group_offset: int = 0) -> Rollouts:
        """Samples ``idx`` (in that order), group ids renumbered 0.. in order of appearance (+ ``group_offset``)."""
        out = Rollouts()
        remap: dict[int, int] = {}
        for i in idx:
            for f in fields(self):
                getattr(out, f.name).append(getattr(self, f.name)[i])
            out.group_ids[-1] = remap.setdefault(self.group_ids[i], group_offset + len(remap))
        return out

    def extend(self, other: Rollouts) -> None:
        """Append ``other``'s samples (its group ids must already be distinct from this batch's)."""
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def groups(self) -> dict[int, list[int]]:
        """Group id -> sample indices, groups in order of first appearance."""
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids):
            out.setdefault(g, []).append(i)
        return out


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
    """Rank 0 samples ``n`` responses per prompt and grades them; every rank gets the same Rollouts.

    Grading is data.verify's (``rl.truncated_grading``, the segmentation's think markers, the prompt text to
    see whether it opened a think block). Aborted samples are kept here (``finish_reasons``) and graded
    wrong; the RL step drops them (``drop_aborted``).
    """
    from megatron_scpo.data.verify import Grading

    result = None
    if rt.is_main:
        grading = Grading.from_config(rt.cfg)
        prompts = [rt.encode_prompt(t) for t in prompt_texts]
        out = rt.engine.generate(prompts, n, params)
        r = Rollouts()
        for gi, (rec, text, samples) in enumerate(zip(records, prompt_texts, out)):
            for s in samples:
                r.prompt_ids.append(list(s.prompt_ids))
                r.response_ids.append(list(s.token_ids))
                r.rollout_logprobs.append(list(s.logprobs))
                r.texts.append(s.text)
                r.truncated.append(s.finish_reason == "length")
                r.correct.append(grading.grade(s.text, str(rec.answer), s.finish_reason, prompt=text))
                r.finish_reasons.append(str(s.finish_reason))
                r.group_ids.append(gi)
                r.prompt_keys.append(str(rec.id))
                r.golds.append(str(rec.answer))
                r.problems.append(rec.problem)
                r.difficulty.append((rec.meta or {}).get("difficulty"))
                r.offsets.append(token_offsets(rt.tokenizer, s.token_ids, s.text))
        result = r
    return broadcast_object(result)


def drop_aborted(r: Rollouts, min_group_size: int = 2) -> tuple[Rollouts, int, int]:
    """Remove samples with finish reason ``abort``, then groups left with fewer than ``min_group_size``.

    An aborted sample (the engine gave up: server restart, request cancelled) is no answer at all: training
    on it as a wrong answer would punish whatever tokens it had produced. Its group is re-normalized over
    the samples that remain (the method simply sees a smaller group); a group of one has no baseline and
    is dropped whole. Returns (kept rollouts with group ids renumbered 0.., aborted samples, dropped groups).
    """
    aborted = sum(1 for f in r.finish_reasons if f == "abort")
    keep: list[int] = []
    dropped = 0
    for idx in r.groups().values():
        ok = [i for i in idx if r.finish_reasons[i] != "abort"]
        if len(ok) >= min_group_size:
            keep.extend(ok)
        else:
            dropped += 1
    return r.select(keep), aborted, dropped


def filter_uniform_groups(r: Rollouts) -> tuple[Rollouts, int]:
    """DAPO dynamic sampling's filter: drop groups whose samples are all correct or all wrong.

    The criterion is the graded correctness the method sees (after ``drop_aborted`` and truncated grading),
    i.e. DAPO's "accuracy std 0" (verl ``filter_groups.metric: acc``). For accuracy-driven methods such a
    group has zero advantage; for length-aware methods an all-correct group still carries a length signal,
    which this filter discards (documented next to ``rl.dynamic_sampling``). Returns (kept, filtered groups).
    """
    keep: list[int] = []
    filtered = 0
    for idx in r.groups().values():
        if len({r.correct[i] for i in idx}) > 1:
            keep.extend(idx)
        else:
            filtered += 1
    return r.select(keep), filtered


def draw_seed(seed: int, draw: int) -> int:
    """Sampling seed of generation round ``draw`` of a step whose seed is ``seed`` (round 0 keeps ``seed``).

    A pure function of (step seed, round), so a resumed step repeats every round exactly; kept below 2**31
    for engines with 32-bit seeds.
    """
    return seed if draw == 0 else (seed * 1_000_003 + draw * 7_919) % (2**31 - 1)


@dataclass
class Collected:
    """What ``collect_rollouts`` hands the rest of the step."""

    rollouts: Rollouts
    drawn: list[Any]  # every record drawn this step (data consumption, in order)
    metrics: dict[str, float]


def collect_rollouts(rt: Runtime, method: Any, records: Sequence[Any], seed: int,
                     draw: Callable[[int], Sequence[Any]] | None = None) -> Collected:
    """Rollouts of the step's prompts, graded, aborted samples dropped, optionally dynamic sampling.

    Without ``rl.dynamic_sampling``: one generation round on ``records``. With it: rounds continue on
    ``draw(prompts_per_step)`` (the run's PromptIterator, so the data position advances by exactly the
    prompts drawn and a resume repeats them) until ``len(records)`` informative groups are kept or
    ``rl.max_draws`` rounds ran; surplus groups of the last round are discarded (as verl does). Round k
    samples with ``draw_seed(seed, k)``. Every rank takes the same decisions (they read broadcast data).
    Collective: every rank must call it.
    """
    from megatron_scpo.data.templates import render_prompt

    cfg = rt.cfg
    target = len(records)
    if cfg.rl.dynamic_sampling and draw is None:
        raise ValueError("rl.dynamic_sampling needs a prompt source to draw more prompts from (draw=...)")
    kept = Rollouts()
    drawn: list[Any] = []
    batch: Sequence[Any] = records
    m = {"rollout/aborted": 0.0, "rollout/dropped_groups": 0.0, "rollout/filtered_groups": 0.0, "rollout/draws": 0.0}
    for k in range(cfg.rl.max_draws):
        if k > 0:
            batch = list(draw(target))  # type: ignore[misc]
        drawn.extend(batch)
        texts = [method.prepare_prompt(render_prompt(rec.problem, cfg.data.template, rt.tokenizer), str(rec.id))
                 for rec in batch]
        params = sampling_params(rt, cfg.rollout.temperature, draw_seed(seed, k))
        r = generate_rollouts(rt, batch, texts, cfg.rollout.n_samples, params)
        m["rollout/draws"] += 1
        r, aborted, dropped = drop_aborted(r)
        m["rollout/aborted"] += aborted
        m["rollout/dropped_groups"] += dropped
        keep: Sequence[int] = range(r.size)
        if cfg.rl.dynamic_sampling:
            r, filtered = filter_uniform_groups(r)
            m["rollout/filtered_groups"] += filtered
            keep = [i for g in list(r.groups().values())[: target - kept.num_groups] for i in g]
        kept.extend(r.select(keep, group_offset=kept.num_groups))
        if not cfg.rl.dynamic_sampling or kept.num_groups >= target:
            break
    m["rollout/groups"] = float(kept.num_groups)
    return Collected(kept, drawn, m)


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


def train_on(rt: Runtime, padded: PaddedBatch, tensors: dict[str, torch.Tensor], loss: str,
             loss_kwargs: dict[str, Any], mini_batches: int, micro_batch_size: int,
             sample_mask: torch.Tensor | None = None) -> dict[str, float]:
    """``mini_batches`` optimizer steps over consecutive slices of the batch; metrics averaged over them.

    With data parallelism the slice's rows are split over the DP ranks in equal counts balanced by token
    count (``backend.packing.balanced_partition``, LPT; verl balances DP ranks by sequence length too), and
    the backend all-reduces gradients and normalizes the loss over the global token count, so the split
    changes no number beyond float summation order. Micro-batches inside a rank are the backend's
    (``parallel.packed_sequences``, ``parallel.max_tokens_per_micro_batch``).

    ``sample_mask`` [B] bool (e.g. DAPO overlong filtering): rows outside it stay in the batch but leave
    the loss mask, so they add nothing to the loss numerator, its denominator (tokens for token-mean,
    sequences for seq-mean-token-mean) or the KL term. A mini-batch with no loss token left (on any rank:
    the decision reads the global batch, so every rank agrees) is not stepped and counts in
    ``train/empty_minibatches``: a step on a zero gradient would still move the weights through Adam's
    momentum and weight decay. When samples were dropped (aborts, dynamic sampling) and the batch has fewer
    than ``mini_batches * dp`` rows, it is cut into ``max(1, B // dp)`` mini-batches, and a slice with fewer
    rows than DP ranks is padded with fully masked copies of its first row.
    """
    B = padded.input_ids.shape[0]
    info = getattr(rt.policy, "info", None)
    dp, dp_rank = (info.dp, info.dp_rank) if info is not None else (1, 0)
    n_mb = min(mini_batches, max(1, B // dp))
    bounds = [round(i * B / n_mb) for i in range(n_mb + 1)]
    seq_lens = padded.seq_lens
    loss_mask = padded.loss_mask if sample_mask is None else padded.loss_mask & sample_mask.bool()[:, None]
    agg: dict[str, float] = {}
    skipped = empty = 0
    steps: list[dict[str, Any]] = []
    for k in range(n_mb):
        rows = list(range(bounds[k], bounds[k + 1]))
        if not bool(loss_mask[rows].any()):
            empty += 1
            continue
        n_pad = max(0, dp - len(rows))
        cand, is_pad = rows + [rows[0]] * n_pad, [False] * len(rows) + [True] * n_pad
        # DP ranks get equal row counts balanced by tokens (LPT), not every dp-th row in arrival order
        part = balanced_partition([seq_lens[i] for i in cand], dp, equal_size=True)[dp_rank]
        idx, pad = [cand[j] for j in part], torch.tensor([is_pad[j] for j in part], dtype=torch.bool)
        sub = padded.select(idx)
        s = sub.input_ids.shape[1]
        batch = {"input_ids": sub.input_ids, "attention_mask": sub.attention_mask,
                 "loss_mask": loss_mask[idx, :s] & ~pad[:, None]}
        for name, t in tensors.items():
            batch[name] = t[idx] if t.dim() == 1 else t[idx, :s]
        m = rt.train_step(batch, loss, loss_kwargs, micro_batch_size)
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


def sampling_params(rt: Runtime, temperature: float, seed: int) -> Any:
    """Rollout sampling settings; EOS always stops. The seed is a function of the step (exact resume)."""
    from megatron_scpo.rollout.base import SamplingParams

    ro = rt.cfg.rollout
    return SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                          stop=list(ro.stop), stop_token_ids=sorted({rt.eos_id, *ro.stop_token_ids}), seed=seed)


def rl_step(rt: Runtime, method: Any, records: Sequence[Any], step: int, seed: int,
            draw: Callable[[int], Sequence[Any]] | None = None) -> dict[str, Any]:
    """One full RL step on ``records`` (the step's prompts); returns the step's metrics.

    ``draw(n)`` gives the next ``n`` prompts of the run's data order; it is required with
    ``rl.dynamic_sampling`` (``collect_rollouts``) and unused otherwise. Collective: every rank calls it.
    """
    cfg = rt.cfg
    info = getattr(rt.policy, "info", None)
    dp = info.dp if info is not None else 1
    if cfg.rl.prompts_per_step * cfg.rollout.n_samples < cfg.rl.mini_batches * dp:
        raise ValueError(f"rl.mini_batches={cfg.rl.mini_batches} mini-batches of {cfg.rl.prompts_per_step} x "
                         f"{cfg.rollout.n_samples} samples leave fewer samples than the {dp} data-parallel ranks: "
                         "raise rl.prompts_per_step or lower rl.mini_batches")
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
    pos_before = dict(getattr(rt.policy, "position_stats", {}))
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
    tensors = {
        "advantages": padded.scatter(adv.to(torch.float32)),
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
            tensors["ref_logprobs"] = ref.logprobs(rt, padded, temperature=T)
        loss_kwargs["kl_coef"] = cfg.algo.loss.kl_coef
    if cfg.algo.loss.tis_cap is not None:  # truncated importance sampling: rollout vs trainer log-probs
        tensors["rollout_logprobs"] = rollout_lp
        loss_kwargs["tis_cap"] = cfg.algo.loss.tis_cap
    with timer.phase("train"):
        train_m = train_on(rt, padded, tensors, "policy", loss_kwargs, cfg.rl.mini_batches, cfg.rl.micro_batch_size,
                           sample_mask=sample_mask)
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
    pos = {k: v - pos_before.get(k, 0) for k, v in getattr(rt.policy, "position_stats", {}).items()}
    if pos.get("computed_positions"):  # every backend pass of the step (old/ref log-probs, importance, train)
        metrics["perf/padding_efficiency"] = pos["real_tokens"] / pos["computed_positions"]
        metrics["perf/padded_layout_efficiency"] = pos["real_tokens"] / max(pos["padded_positions"], 1)
    metrics.update(timer.metrics())
    metrics["perf/train_tokens_per_s"] = n_tok / max(timer.seconds.get("train", 0.0), 1e-9)
    metrics["weight_version"] = rt.weight_version
    metrics["data/prompt_ids"] = prompt_ids
    return metrics
