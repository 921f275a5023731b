"""The SFT stages: warm start on verbose traces, and stage 1 rejection-sampling SFT.

Warm start turns a randomly initialised tiny model into our "long-CoT reasoning model": it learns the
synthetic task from *verbose* solutions (critical steps mixed with redundant ones), so there is real
redundancy for stage 1/2 to remove. Stage 1 (SmartThinker RS+SFT): sample N per problem from the current
model, keep the verified-correct ones, keep the shortest correct (or all below the group median), SFT on
their response tokens only.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from megatron_scpo.trainer.batching import dp_share, pad_batch
from megatron_scpo.trainer.loss import SFTLoss
from megatron_scpo.trainer.metrics import ACC_MEAN, LENGTH_MEAN, TRAIN_METRIC_NAMES, PhaseTimer, progress
from megatron_scpo.trainer.preempt import Preempted, StopRequest
from megatron_scpo.trainer.rollouts import generate_rollouts, sampling_params
from megatron_scpo.trainer.runtime import Runtime

Pair = tuple[list[int], list[int]]  # (prompt ids, response ids incl. EOS)


def set_lr(policy: Any, lr: float) -> None:
    policy.set_lr(lr)


def warmup_lr(base: float, step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to 10% of ``base`` (short SFT runs converge faster with a decay)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def trace_pairs(rt: Runtime, records: Sequence[Any], trace: str) -> list[Pair]:
    """(prompt, completion + EOS) token pairs from records carrying synthetic traces in ``meta``."""
    from megatron_scpo.data.templates import render_prompt

    pairs = []
    for rec in records:
        text = (rec.meta or {}).get(trace)
        if text is None:
            raise ValueError(f"record {rec.id}: no {trace!r} trace in meta; warm-start SFT needs the synthetic task")
        prompt = rt.encode_prompt(render_prompt(rec.problem, rt.cfg.data.template, rt.tokenizer))
        pairs.append((prompt, rt.tokenizer.encode(text, add_special_tokens=False) + [rt.eos_id]))
    return pairs


class SFTCursor:
    """Where an SFT phase stands: steps done and the data order still to come (seeded epoch-wise shuffles).

    Its ``state_dict`` is JSON (the checkpoint's ``trainer_state.json``), so a resume continues the same
    batch sequence and the same LR schedule position instead of redoing the phase.
    """

    def __init__(self, stage: str, seed: int, n: int):
        self.stage = stage
        self.n = n
        self.step = 0
        self.order: list[int] = []
        self.rng = random.Random(f"sft:{stage}:{seed}")

    def next_batch(self, batch_size: int) -> list[int]:
        while len(self.order) < batch_size:
            epoch = list(range(self.n))
            self.rng.shuffle(epoch)
            self.order += epoch
        idx, self.order = self.order[:batch_size], self.order[batch_size:]
        return idx

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"stage": self.stage, "n": self.n, "step": self.step, "order": list(self.order),
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("stage") != self.stage or sd.get("n") != self.n:
            raise ValueError(f"SFT checkpoint position is for stage {sd.get('stage')!r} with {sd.get('n')} sequences,"
                             f" not {self.stage!r} with {self.n}; the data or config changed since it was written")
        self.step = int(sd["step"])
        self.order = [int(i) for i in sd["order"]]
        version, internal, gauss = sd["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def sft_train(rt: Runtime, pairs: Sequence[Pair], *, steps: int, batch_size: int, micro_batch_size: int,
              lr: float, warmup_steps: int, seed: int, stage: str, log_every: int = 10,
              stop: StopRequest | None = None, checkpoint_interval: int = 0,
              save: Callable[[dict[str, Any]], None] | None = None,
              position: dict[str, Any] | None = None) -> dict[str, float]:
    """``steps`` optimizer steps of response-token NLL over batches drawn in a seeded, epoch-wise order.

    ``save(cursor_state)`` (collective) writes a checkpoint of the position after every
    ``checkpoint_interval``-th step and when a stop is requested (``stop.poll()``, collective, after every
    step), after which Preempted is raised. ``position`` (a saved cursor state) resumes mid-phase: the
    model/optimizer/RNG come from the same checkpoint, so the rest of the phase equals an uninterrupted run.
    The last step is never checkpointed here: the caller's stage snapshot is that position.
    """
    if not pairs:
        raise ValueError(f"{stage}: no training sequences")
    cursor = SFTCursor(stage, seed, len(pairs))
    if position is not None:
        cursor.load_state_dict(position)
    last: dict[str, float] = {}
    enabled = rt.cfg.logging.progress and rt.is_main
    for step in progress(range(cursor.step, steps), total=steps - cursor.step, desc=stage, enabled=enabled):
        timer = PhaseTimer()
        idx = cursor.next_batch(batch_size)
        cur_lr = warmup_lr(lr, step, warmup_steps, steps)
        set_lr(rt.policy, cur_lr)
        padded = pad_batch([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], rt.pad_id)
        # this DP rank's rows: equal counts balanced by tokens, as RL's mini-batches (batching.dp_share)
        batch = dp_share(padded.train_batch(), range(len(idx)), rt.policy.info.dp, rt.policy.info.dp_rank)
        with timer.phase("train"):
            m = rt.train_step(batch, SFTLoss(), micro_batch_size)
        rt.global_step += 1
        cursor.step = step + 1
        last = {TRAIN_METRIC_NAMES.get(k, k): float(v) for k, v in m.items() if isinstance(v, (int, float))}
        if step % log_every == 0 or step == steps - 1:
            rt.logger.log(stage, step, {**last, "lr": cur_lr, **timer.metrics(),
                                        LENGTH_MEAN: sum(padded.response_lens) / len(idx)})
        if step + 1 == steps:
            break
        stopping = stop is not None and stop.poll()
        if save is not None and (stopping or (checkpoint_interval and (step + 1) % checkpoint_interval == 0)):
            save(cursor.state_dict())
        if stopping:
            if rt.is_main:
                where = "checkpointed" if save is not None else "not checkpointed; the restart redoes the phase"
                print(f"[stop] {stage}: stopping after SFT step {step + 1}/{steps} ({where})", flush=True)
            raise Preempted(f"{stage} step {step + 1}")
    return last


def select_rejection_samples(groups: Sequence[Sequence[tuple[list[int], list[int], bool]]],
                             rule: str) -> list[Pair]:
    """Per problem: keep verified-correct samples, then the shortest one or all strictly below the median.

    ``groups[p]`` holds ``(prompt_ids, response_ids, correct)`` per sample. With ``below_median`` a group
    whose correct samples all share one length keeps its shortest one (never an empty pick for a solved
    problem). Ties for the shortest keep the first sample (deterministic).
    """
    if rule not in ("shortest", "below_median"):
        raise ValueError(f"unknown selection rule {rule!r}")
    out: list[Pair] = []
    for g in groups:
        ok = [(p, r) for p, r, c in g if c]
        if not ok:
            continue
        if rule == "shortest":
            out.append(min(ok, key=lambda pr: len(pr[1])))
            continue
        med = statistics.median(len(r) for _, r in ok)
        below = [(p, r) for p, r in ok if len(r) < med]
        out.extend(below or [min(ok, key=lambda pr: len(pr[1]))])
    return out


def rejection_sample(rt: Runtime, records: Sequence[Any]) -> tuple[list[Pair], dict[str, float]]:
    """Stage 1 data: sample ``n_samples`` per record, grade (data/verify.py), select. Same result on every rank."""
    from megatron_scpo.data.templates import render_prompt

    c = rt.cfg.stage1
    params = sampling_params(rt, c.temperature, seed=rt.cfg.rl.seed + 7)
    texts = [render_prompt(rec.problem, rt.cfg.data.template, rt.tokenizer) for rec in records]
    r = generate_rollouts(rt, records, texts, c.n_samples, params)
    groups: list[list[tuple[list[int], list[int], bool]]] = [[] for _ in records]
    for i in range(r.size):
        # only finished samples (finish reason stop) are candidates: a truncated or aborted one never counts
        # as a clean correct trace, whatever rl.truncated_grading says (its grade comes from data/verify.py)
        if r.finish_reasons[i] == "stop":
            groups[r.group_ids[i]].append((r.prompt_ids[i], r.response_ids[i], r.correct[i]))
    pairs = select_rejection_samples(groups, c.select)
    lens = [len(x) for x in r.response_ids]
    stats = {
        ACC_MEAN: sum(r.correct) / max(1, r.size),
        LENGTH_MEAN: sum(lens) / max(1, len(lens)),
        "stage1/kept": float(len(pairs)),
        "stage1/solved_frac": sum(1 for g in groups if any(c for *_, c in g)) / max(1, len(groups)),
        "stage1/kept_length_mean": sum(len(p[1]) for p in pairs) / max(1, len(pairs)),
    }
    return pairs, stats
