"""Grading, aborted samples and dynamic sampling before rewards (issue 11 items 2-4), without Megatron.

A fake runtime (the real tiny tokenizer, a scripted engine) drives the trainer's own functions:
``generate_rollouts`` (RL and stage 1), ``rejection_sample``, evaluation's ``score_samples`` and
``collect_rollouts``. Expected values are written by hand from the scripted samples.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_scpo.data.datasets import PromptIterator, PromptRecord
from megatron_scpo.data.templates import render_prompt
from megatron_scpo.data.verify import Grading, grade, think_closed, think_open_at_end
from megatron_scpo.rollout.base import Sample

SYN_PROMPT = render_prompt("2 + 3", "synthetic")  # ends with "<think>"
DONE = "\n2 + 3 = 5\n</think>\n\\boxed{5}"  # a finished, correct completion
CUT = "\n2 + 3 = 5, so \\boxed{5} hmm wait let me"  # cut inside its thinking, a correct-looking box


@pytest.mark.parametrize("response,reason,prompt,expect_wrong,expect_grade", [
    (DONE, "stop", SYN_PROMPT, True, True),
    (DONE, "length", SYN_PROMPT, False, True),  # finish reason length: wrong by default
    (CUT, "stop", SYN_PROMPT, False, True),  # EOS inside the think block the prompt opened
    (CUT, "length", SYN_PROMPT, False, True),
    (DONE, "abort", SYN_PROMPT, False, False),  # never an answer
    ("\\boxed{5}", "stop", "Q: 2 + 3\nA:", True, True),  # no think block anywhere: graded
    ("<think>5</think> \\boxed{5}", "stop", "Q: 2 + 3\nA:", True, True),  # the response opens and closes one
    ("<think>so \\boxed{5}", "stop", "Q: 2 + 3\nA:", False, True),  # the response opens one and never closes
    ("\n2 + 3 = 6\n</think>\n\\boxed{6}", "stop", SYN_PROMPT, False, False),  # finished but wrong
    # the prompt's think block was closed by a pre-filled "<think>\n\n</think>" (thinking disabled)
    ("\\boxed{5}", "stop", "A: <think>\n\n</think>\n\n", True, True),
])  # fmt: skip
def test_grade_truncated_and_unclosed_are_wrong_by_default(response, reason, prompt, expect_wrong, expect_grade):
    assert grade(response, "5", reason, prompt=prompt) is expect_wrong
    assert grade(response, "5", reason, prompt=prompt, truncated="grade") is expect_grade
    assert Grading("grade").grade(response, "5", reason, prompt) is expect_grade


def test_think_markers_and_templates():
    assert think_open_at_end(render_prompt("1 + 1", "raw_think"), "<think>", "</think>")  # mentions both, ends open
    assert think_open_at_end(SYN_PROMPT, "<think>", "</think>")
    assert not think_open_at_end("no markers", "<think>", "</think>")
    assert not think_open_at_end(SYN_PROMPT, "", "")  # no markers configured: nothing is ever open
    assert think_closed("x</think>y", True) and not think_closed("x", True) and think_closed("x", False)
    # custom markers (algo.segmentation.think_open/close) reach the grade through Grading.from_config
    cfg = SimpleNamespace(rl=SimpleNamespace(truncated_grading="wrong"), data=SimpleNamespace(answer_extraction="boxed"),
                          algo=SimpleNamespace(segmentation=SimpleNamespace(think_open="<r>", think_close="</r>")))
    g = Grading.from_config(cfg)
    assert g.grade("5 </r> \\boxed{5}", "5", "stop", "Q <r>") and not g.grade("\\boxed{5}", "5", "stop", "Q <r>")
    with pytest.raises(ValueError, match="truncated grading"):
        grade(DONE, "5", "stop", truncated="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finish_reason"):
        grade(DONE, "5", "eos")


# ------------------------------------------------------------------------------------------- fake runtime
def _cfg(*overrides: str):
    from megatron_scpo.config import load_config

    return load_config(None, ["data.template=synthetic", "rollout.n_samples=4", "rl.prompts_per_step=2",
                              *overrides])


class ScriptedEngine:
    """``generate`` returns ``script(prompt_index, sample_index, call) -> (text, finish_reason)`` samples."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls, self.seeds = tok, script, 0, []

    def generate(self, prompts, n, params):
        self.seeds.append(params.seed)
        out = []
        for p, ids in enumerate(prompts):
            row = []
            for j in range(n):
                text, reason = self.script(p, j, self.calls)
                toks = self.tok.encode(text, add_special_tokens=False) or [self.tok.eos_token_id]
                row.append(Sample(list(ids), toks, text, [-0.5] * len(toks), reason))
            out.append(row)
        self.calls += 1
        return out


def _rt(cfg, script):
    from megatron_scpo.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return SimpleNamespace(cfg=cfg, is_main=True, tokenizer=tok, engine=ScriptedEngine(tok, script),
                           eos_id=int(tok.eos_token_id), policy=None,
                           encode_prompt=lambda t: [tok.bos_token_id, *tok.encode(t, add_special_tokens=False)])


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", problem=f"{i} + 1", answer=str(i + 1)) for i in range(n)]


class _Identity:
    needs_importance = False

    def prepare_prompt(self, prompt: str, key: str) -> str:
        return prompt


def _done(ans: int) -> str:
    return f"\nstep\n</think>\n\\boxed{{{ans}}}"


def test_truncated_samples_graded_wrong_in_rl_stage1_and_eval():
    """A correct-looking box in a sample cut at max_new_tokens or inside its thinking is wrong everywhere."""
    from megatron_scpo.trainer.evaluate import score_samples
    from megatron_scpo.trainer.rollouts import generate_rollouts, sampling_params
    from megatron_scpo.trainer.sft import rejection_sample

    samples = [(_done(1), "stop"), (_done(1), "length"), ("\nso \\boxed{1}", "stop"), (_done(1), "abort")]
    expect = [True, False, False, False]  # by hand: only the finished one counts
    recs = _records(1)
    for over, exp in (((), expect), (("rl.truncated_grading=grade",), [True, True, True, False])):
        cfg = _cfg(*over)
        rt = _rt(cfg, lambda p, j, c: samples[j])
        texts = [render_prompt(r.problem, "synthetic") for r in recs]
        r = generate_rollouts(rt, recs, texts, 4, sampling_params(rt, 1.0, 0))
        assert r.correct == exp, over
        assert r.finish_reasons == ["stop", "length", "stop", "abort"]
        outs = rt.engine.generate([[1]], 4, sampling_params(rt, 1.0, 0))
        rows = score_samples(recs, outs, rt.tokenizer, False, Grading.from_config(cfg), texts)
        assert [row["correct"] for row in rows] == exp, over
    # evaluation without explicit settings uses the default (wrong) grading
    assert [row["correct"] for row in score_samples(recs, outs, rt.tokenizer, False, None, texts)] == expect
    # stage 1 keeps the shortest finished (finish reason stop), correct sample: by default the closed one; with
    # ``grade`` the shorter unclosed one counts too; the length-truncated one never (no EOS: not a clean trace)
    for over, pick in (((), 0), (("rl.truncated_grading=grade",), 2)):
        rt = _rt(_cfg("stage1.n_samples=4", *over), lambda p, j, c: samples[j])
        pairs, stats = rejection_sample(rt, recs)
        assert len(pairs) == 1 and pairs[0][1] == rt.tokenizer.encode(samples[pick][0], add_special_tokens=False)


def test_aborted_samples_dropped_and_groups_renormalized():
    """Aborts never reach rewards: their group shrinks, a group left with one sample is dropped."""
    from megatron_scpo.algo.registry import build_method
    from megatron_scpo.trainer.rl import grouped, segment
    from megatron_scpo.trainer.rollouts import collect_rollouts

    # prompt 0: [right, abort, wrong, right]; prompt 1: [abort, abort, abort, right] -> 1 left: dropped;
    # prompt 2: [wrong, right, wrong, wrong]
    plan = {0: ["r", "a", "w", "r"], 1: ["a", "a", "a", "r"], 2: ["w", "r", "w", "w"]}

    def script(p, j, _c):
        kind = plan[p][j]
        return (_done(p + 1 if kind == "r" else 99), "abort" if kind == "a" else "stop")

    cfg = _cfg("rl.prompts_per_step=3")
    rt = _rt(cfg, script)
    col = collect_rollouts(rt, _Identity(), _records(3), seed=5)
    r = col.rollouts
    assert col.metrics["rollout/aborted"] == 4 and col.metrics["rollout/dropped_groups"] == 1
    assert col.metrics["rollout/groups"] == 2 and col.metrics["rollout/draws"] == 1
    assert r.group_ids == [0, 0, 0, 1, 1, 1, 1] and r.correct == [True, False, True, False, True, False, False]
    assert "abort" not in r.finish_reasons and r.prompt_keys[0] == "p0" and r.prompt_keys[3] == "p2"
    # GRPO on what is left: group 0 = [1, 0, 1] -> mean 2/3, unbiased std sqrt(1/3); computed by hand
    method = build_method(cfg.algo.__class__(method="grpo"))
    out = method.compute(grouped(r, segment(rt, r), None))
    seq_adv = [float(out.advantages[i, 0]) for i in range(r.size)]
    s0, s1 = (1 / 3) ** 0.5, 0.5  # group 1 = [0, 1, 0, 0]: mean 1/4, unbiased std 1/2
    want = [(1 - 2 / 3) / s0, (0 - 2 / 3) / s0, (1 - 2 / 3) / s0, -0.25 / s1, 0.75 / s1, -0.25 / s1, -0.25 / s1]
    assert seq_adv == pytest.approx(want, rel=1e-4)


def test_dynamic_sampling_fills_batch_deterministically():
    """Uniform groups are filtered; rounds draw prompts_per_step more until the batch is full (or max draws)."""
    from megatron_scpo.trainer.rollouts import collect_rollouts, draw_seed

    recs = [PromptRecord(id=f"q{i}", problem=f"{i} + 1", answer=str(i)) for i in range(40)]
    # by the gold: answer % 3 == 0 -> all right, == 2 -> all wrong, == 1 -> mixed (2 right, 2 wrong)
    def script(p, j, call):
        gold = int(batches[call][p].answer)
        right = gold % 3 == 0 or (gold % 3 == 1 and j % 2 == 0)
        return _done(gold if right else 999), "stop"

    for max_draws, P in ((4, 3), (2, 3), (6, 5)):
        cfg = _cfg(f"rl.prompts_per_step={P}", "rl.dynamic_sampling=true", f"rl.dynamic_sampling_max_draws={max_draws}")
        it = PromptIterator(recs, seed=3)
        batches: list[list[PromptRecord]] = []

        def draw(n, it=it, batches=batches):
            batches.append(it.next_batch(n))
            return batches[-1]

        rt = _rt(cfg, script)
        first = draw(P)
        col = collect_rollouts(rt, _Identity(), first, seed=11, draw=draw)
        # the same decisions computed another way: walk the same data order round by round
        ref_it, kept, rounds, filtered = PromptIterator(recs, seed=3), [], 0, 0
        while len(kept) < P and rounds < max_draws:
            rnd = ref_it.next_batch(P)
            rounds += 1
            good = [r.id for r in rnd if int(r.answer) % 3 == 1]
            filtered += P - len(good)
            kept += good[: P - len(kept)]
        assert col.metrics["rollout/draws"] == rounds and col.metrics["rollout/filtered_groups"] == filtered
        assert col.metrics["rollout/groups"] == len(kept)
        assert list(dict.fromkeys(col.rollouts.prompt_keys)) == kept
        assert col.rollouts.group_ids == [g for g in range(len(kept)) for _ in range(4)]
        assert [r.id for r in col.drawn] == [r.id for b in batches for r in b]
        assert it.state_dict() == ref_it.state_dict()  # data position advanced by exactly the prompts drawn
        assert rt.engine.seeds == [draw_seed(11, k) for k in range(rounds)] and rt.engine.seeds[0] == 11
        assert len(set(rt.engine.seeds)) == rounds
        for idx in col.rollouts.groups().values():  # every kept group carries signal
            assert len({col.rollouts.correct[i] for i in idx}) == 2
    # off by default: one round, nothing filtered even when every group is uniform
    rt = _rt(_cfg(), lambda p, j, c: (_done(p + 1), "stop"))
    col = collect_rollouts(rt, _Identity(), _records(2), seed=1)
    assert col.metrics["rollout/draws"] == 1 and col.metrics["rollout/filtered_groups"] == 0
    assert col.rollouts.size == 8


def test_dynamic_sampling_config_keys():
    from megatron_scpo.config import ConfigError

    assert _cfg().rl.max_draws == 1 and _cfg("rl.dynamic_sampling=true").rl.max_draws == 4
    with pytest.raises(ConfigError, match="dynamic_sampling_max_draws does nothing"):
        _cfg("rl.dynamic_sampling_max_draws=3")
    with pytest.raises(ConfigError, match="dynamic_sampling_max_draws"):
        _cfg("rl.dynamic_sampling=true", "rl.dynamic_sampling_max_draws=0")
    with pytest.raises(ConfigError, match="truncated_grading"):
        _cfg("rl.truncated_grading=maybe")
    with pytest.raises(ConfigError):
        _cfg("rl.overlong_reward=zero_advantage")  # replaced by rl.overlong_filter (real masking)


def test_train_on_masks_rows_and_skips_empty_minibatches():
    """Overlong-filtered rows leave the loss mask; a mini-batch with no loss token left is not stepped."""
    from megatron_scpo.trainer.batching import pad_batch
    from megatron_scpo.trainer.loss import SFTLoss
    from megatron_scpo.trainer.rl import train_on

    packed = pad_batch([[1, 2]] * 4, [[3, 4], [5], [6, 7, 8], [9]], pad_id=0)
    seen = []
    rt = SimpleNamespace(policy=SimpleNamespace(info=SimpleNamespace(dp=1, dp_rank=0)),
                         train_step=lambda b, *a: seen.append(b.loss_mask.clone()) or {"loss": 1.0})
    keep = torch.tensor([True, True, False, False])
    m = train_on(rt, packed.train_batch(), SFTLoss(), 2, 4, sample_mask=keep)
    assert len(seen) == 1 and seen[0].sum() == 3 and m["train/empty_minibatches"] == 1
    assert m["train/mini_batches"] == 1 and m["loss"] == 1.0
    # two DP ranks, a batch of 2 rows left after drops and 2 mini-batches configured: one mini-batch of 2 rows
    # (split balanced by tokens: rank 0 gets the longer row)
    for rank in (0, 1):
        seen.clear()
        rt.policy.info = SimpleNamespace(dp=2, dp_rank=rank)
        m = train_on(rt, packed.select([0, 2]).train_batch(), SFTLoss(), 2, 4)
        assert m["train/mini_batches"] == 1 and len(seen) == 1 and int(seen[0].sum()) == (3 if rank == 0 else 2)
    # one row for two DP ranks: rank 1 gets a fully masked copy (no loss token, same shapes)
    seen.clear()
    m = train_on(rt, packed.select([2]).train_batch(), SFTLoss(), 1, 4)
    assert len(seen) == 1 and int(seen[0].sum()) == 0
