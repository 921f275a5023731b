"""Rollout collection, shared by stage 1 (``sft.rejection_sample``) and stage 2 (``rl.rl_step``).

Rollouts happen on rank 0 and are broadcast (runtime.py explains why): ``generate_rollouts`` samples and
grades, ``collect_rollouts`` adds stage 2's filters. Every sample is graded by data/verify.py (truncated or
unclosed responses are wrong unless ``rl.truncated_grading: grade``); samples the engine aborted are dropped
and their group shrinks (a group with fewer than 2 samples left is dropped: it has no baseline); with
``rl.dynamic_sampling`` groups whose correctness is all equal are filtered and more prompts are drawn.
Metrics of these filters: ``rollout/aborted``, ``rollout/dropped_groups``, ``rollout/filtered_groups``,
``rollout/draws``, ``rollout/groups`` (``rollout/overlong_filtered`` is rl_step's, with ``rl.overlong_filter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from megatron_scpo.backend.parallel import broadcast_object
from megatron_scpo.trainer.metrics import ACC_MEAN, LENGTH_MEAN, ROLLOUT_TOKENS_PER_S
from megatron_scpo.trainer.runtime import Runtime

if TYPE_CHECKING:
    from megatron_scpo.algo.registry import Method
    from megatron_scpo.rollout.base import SamplingParams


@dataclass
class Rollouts:
    """One step's samples, flattened (B = prompts x n), identical on every rank after the broadcast.

    Every field is a list with one entry per sample; ``group_ids`` index the step's prompts (0..G-1).
    ``correct`` is data.verify's grade; ``truncated`` (derived) is finish reason ``length``.
    """

    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
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
    def truncated(self) -> list[bool]:
        """Per sample: finish reason ``length`` (cut at ``rollout.max_new_tokens``)."""
        return [f == "length" for f in self.finish_reasons]

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
                      params: SamplingParams) -> Rollouts:
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


def collect_rollouts(rt: Runtime, method: Method, records: Sequence[Any], seed: int,
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


def sampling_params(rt: Runtime, temperature: float, seed: int) -> SamplingParams:
    """Rollout sampling settings; EOS always stops. The seed is a function of the step (exact resume)."""
    from megatron_scpo.rollout import sampling_params as rollout_sampling_params

    return rollout_sampling_params(rt.cfg.rollout, temperature=temperature, seed=seed, eos_id=rt.eos_id)


def rollout_stats(r: Rollouts, rollout_seconds: float) -> dict[str, float]:
    """Length, accuracy and throughput of the step's kept samples (the trainer's home of these names)."""
    lens = torch.tensor([len(x) for x in r.response_ids], dtype=torch.float64)
    q = torch.quantile(lens, torch.tensor([0.5, 0.9], dtype=torch.float64)) if lens.numel() else torch.zeros(2)
    return {
        LENGTH_MEAN: float(lens.mean()),
        "length/max": float(lens.max()),
        "length/p50": float(q[0]),
        "length/p90": float(q[1]),
        "length/truncated_frac": float(sum(r.truncated) / max(1, r.size)),
        ACC_MEAN: float(sum(r.correct) / max(1, r.size)),
        ROLLOUT_TOKENS_PER_S: float(lens.sum()) / max(rollout_seconds, 1e-9),
        "perf/samples": float(r.size),
    }
