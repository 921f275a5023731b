"""Trainer infrastructure without a model: metrics sinks, atomic checkpoints, pass@k/AE, report."""

from __future__ import annotations

import json
import math
import random
from itertools import combinations

import numpy as np
import pytest
import torch

from megatron_scpo.trainer.checkpoint import CHECKPOINT_FORMAT, STATE_FILE, CheckpointManager
from megatron_scpo.trainer.config import LoggingConfig
from megatron_scpo.trainer.evaluate_math import ae_score, aggregate, pass_at_k
from megatron_scpo.trainer.metrics import MetricsLogger, PhaseTimer, read_metrics
from megatron_scpo.trainer.report import write_report


def test_metrics_jsonl_tensorboard_and_nonfinite(tmp_path, capsys):
    log = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True))
    t = PhaseTimer()
    with t.phase("rollout"):
        pass
    log.log("rl/scpo", 1, {"reward/mean": torch.tensor(0.5), "loss": float("nan"), **t.metrics()})
    log.log("rl/scpo", 2, {"reward/mean": 0.25})
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["reward/mean"] == 0.5 and recs[0]["loss"] is None and recs[0]["nonfinite_metrics"] == 1
    for phase in ("rollout", "old_logprob", "importance", "train", "sync"):
        assert f"time/{phase}" in recs[0]
    assert "NONFINITE ['loss']" in capsys.readouterr().out
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    # resume truncation drops records written after the checkpoint
    log2 = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False))
    assert log2.num_records() == 2
    log2.truncate(1)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_checkpoint_atomic_latest_keep_and_rng(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)

    def save_model(d):
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"w")

    for step in (1, 2, 3):
        random.seed(step)
        mgr.save(step, {"stage": "rl", "rl_step": step}, save_model)
    names = [p.name for p in mgr.complete()]
    assert names == ["step_000002", "step_000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    # a crashed save (temp dir without trainer state) is never picked up
    (tmp_path / "checkpoints" / "step_000004.tmp" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000005").mkdir()
    assert mgr.latest().name == "step_000003"
    # RNG round trip: the draws after load equal the draws after save
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    mgr.save(6, {"stage": "rl"}, save_model, snapshot="stage1")
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = []
    state = mgr.load(mgr.snapshot("stage1"), load_model=loaded.append)
    assert state["global_step"] == 6 and loaded[0].name == "model"
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    # the snapshot is not pruned like step checkpoints, and is the newest: `latest` points at it
    assert mgr.latest().name == "stage1" and (mgr.snapshot("stage1") / STATE_FILE).is_file()
    (tmp_path / "checkpoints" / "latest").unlink()  # without the pointer a scan finds the highest step
    assert mgr.latest().name == "stage1"
    mgr.save(7, {"stage": "rl"}, save_model)
    assert [p.name for p in mgr.complete()] == ["step_000003", "step_000007"] and mgr.latest().name == "step_000007"
    # one RNG file per rank, the trainer state last: the on-disk layout the docs describe
    ck = mgr.latest()
    assert sorted(p.name for p in ck.iterdir()) == ["model", "rng", STATE_FILE]
    assert [p.name for p in (ck / "rng").iterdir()] == ["rank0.pt"]
    assert json.loads((ck / STATE_FILE).read_text())["checkpoint_format"] == CHECKPOINT_FORMAT
    # a rank the checkpoint has no RNG file for (the run grew) keeps its own seeded streams, not rank 0's
    torch.manual_seed(123)
    own = torch.rand(1).item()
    torch.manual_seed(123)
    CheckpointManager(tmp_path, rank=1).load(ck)
    assert torch.rand(1).item() == own


def test_checkpoint_crash_mid_save_keeps_previous_and_old_format_is_refused(tmp_path):
    from megatron_scpo.backend.checkpoint import CheckpointError

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"stage": "rl"}, lambda d: d.mkdir(parents=True))

    def crash(d):
        d.mkdir(parents=True)
        (d / "half.distcp").write_bytes(b"x")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed"):
        mgr.save(2, {"stage": "rl"}, crash)
    assert mgr.latest().name == "step_000001" and [p.name for p in mgr.complete()] == ["step_000001"]
    (tmp_path / "checkpoints" / "latest").unlink()  # the scan ignores the half-written temp dir too
    assert mgr.latest().name == "step_000001" and mgr.load(mgr.latest())["global_step"] == 1
    # a crash between replace_dir's two renames (re-saving an existing snapshot) leaves only <name>.old.tmp and
    # <name>.tmp: the next manager renames the complete old copy back instead of losing both
    mgr.save(3, {"stage": "rl"}, lambda d: d.mkdir(parents=True), snapshot="stage1")
    snap = tmp_path / "checkpoints" / "stage1"
    snap.rename(snap.with_name("stage1.old.tmp"))
    (tmp_path / "checkpoints" / "stage1.tmp" / "model").mkdir(parents=True)
    mgr = CheckpointManager(tmp_path)
    assert mgr.snapshot("stage1") == snap and mgr.load(snap)["global_step"] == 3
    # a checkpoint of the previous format (no checkpoint_format, RNG in rng_rank{r}.pt) is refused in one line
    sf = mgr.latest() / STATE_FILE
    sf.write_text(json.dumps({k: v for k, v in json.loads(sf.read_text()).items() if k != "checkpoint_format"}))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: checkpoint_format 1 != 2 \("):
        mgr.load(mgr.latest(), load_model=lambda d: pytest.fail("model loaded from an old-format checkpoint"))


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(4, 1, 2), (5, 2, 3), (6, 0, 2), (6, 6, 4), (8, 3, 1), (7, 4, 5)]:
        subsets = list(combinations([True] * c + [False] * (n - c), k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_ae_score_reproduces_paper_rows():
    # papers.md 3.5: base 9980 tokens / 60.7 acc; SmartThinker 5166 / 61.9 -> 0.54; ShorterBetter 2327 / 52.3 -> 0.07
    assert round(ae_score(60.7, 61.9, 9980, 5166), 2) == 0.54
    sb_len = (1008 + 3727 + 2246) / 3
    assert round(ae_score(60.7, 52.3, 9980, sb_len), 2) == 0.07
    assert ae_score(0.0, 0.5, 100, 50) is None


def test_aggregate_and_report(tmp_path):
    def samples(scale: float, acc_pattern: list[bool]):
        out = []
        for p in range(4):
            for ok in acc_pattern:
                out.append({"prompt_id": p, "difficulty": 1 + p % 2, "correct": ok, "n_tokens": scale * (10 + p),
                            "critical": 4.0, "redundant": scale * 6.0 - 2.0 if scale < 1 else 6.0})
        return out

    base = aggregate(samples(1.0, [True, False]), pass_k=[1, 2])
    assert base["pass@1"] == 0.5 and base["pass@k"]["2"] == 1.0 and base["mean_tokens"] == 11.5
    assert set(base["per_difficulty"]) == {"1", "2"} and base["per_difficulty"]["2"]["mean_tokens"] == 12.0
    short = aggregate(samples(0.5, [True, True]), pass_k=[1, 2])
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "warmstart.json").write_text(json.dumps({**base, "label": "warmstart"}))
    (run / "eval" / "rl_scpo.json").write_text(json.dumps({**short, "label": "rl_scpo"}))
    text = write_report([run], run)
    rows = [line for line in text.splitlines() if line.startswith("| rl_scpo")]
    # tokens halve (-50%), accuracy 0.5 -> 1.0: AE = 0.5 + 3 * 1.0 = 3.5; redundant 6 -> 1 removes 83.3%
    assert "-50.0%" in rows[0] and "3.50" in rows[0] and "83.3%" in rows[0] and "100.0%" in rows[0]
    assert (run / "report.png").stat().st_size > 1000
    # two runs: every row says its run, the first run's warm start is the baseline of both
    other = tmp_path / "other"
    (other / "eval").mkdir(parents=True)
    (other / "eval" / "warmstart.json").write_text(json.dumps({**short, "label": "warmstart"}))
    (other / "eval" / "rl_scpo.json").write_text(json.dumps({**short, "label": "rl_scpo"}))
    text = write_report([run, other], tmp_path / "cmp")
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| run/") or
              line.startswith("| other/")]
    assert labels[:4] == ["run/warmstart", "other/warmstart", "run/rl_scpo", "other/rl_scpo"]
    assert "-50.0%" in next(line for line in text.splitlines() if line.startswith("| other/rl_scpo"))


def test_rejection_selection_rules():
    from megatron_scpo.trainer.sft import select_rejection_samples

    p = [1]
    groups = [
        [(p, [1, 2, 3, 4], True), (p, [1, 2], True), (p, [9], False), (p, [1, 2, 3], True), (p, [5, 6], True)],
        [(p, [1], False)],  # unsolved: nothing kept
        [(p, [7, 7], True), (p, [8, 8], True)],  # equal lengths: below_median keeps the first shortest
    ]
    assert select_rejection_samples(groups, "shortest") == [(p, [1, 2]), (p, [7, 7])]
    # correct lengths 4, 2, 3, 2 -> median 2.5 -> both length-2 responses
    assert select_rejection_samples(groups, "below_median") == [(p, [1, 2]), (p, [5, 6]), (p, [7, 7])]
    with pytest.raises(ValueError):
        select_rejection_samples(groups, "longest")


def test_pack_scatter_gather_roundtrip():
    from megatron_scpo.trainer.batching import pad_batch, pad_response_tensors

    b = pad_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    per_tok = pad_response_tensors([[0.1, 0.2, 0.3], [0.4]])
    seq = b.scatter(per_tok)
    assert seq[0, 2:].tolist() == pytest.approx([0.1, 0.2, 0.3]) and seq[1, 1].item() == pytest.approx(0.4)
    assert torch.equal(b.gather(seq), per_tok)
    sub = b.select([1])
    assert sub.input_ids.tolist() == [[3, 7]] and sub.response_lens == [1]


def test_token_offsets_cover_generated_text():
    from megatron_scpo.data.tokenizer import build_tokenizer
    from megatron_scpo.trainer.rollouts import token_offsets

    tok = build_tokenizer()
    text = "\n3 + 4 = 7\n\nWait, let me check.\n</think>\n\\boxed{7}"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    offs = token_offsets(tok, ids, text)
    assert len(offs) == len(ids) and offs[-1][0] == offs[-1][1] == len(text)  # EOS: empty span at the end
    assert "".join(text[s:e] for s, e in offs) == text


def test_method_state_survives_json_checkpoint(tmp_path):
    """LAPO's length map goes into trainer_state.json: it must be JSON-serializable and load back equal."""
    from megatron_scpo.algo.config import AlgoConfig
    from megatron_scpo.algo.registry import GroupedRollouts, build_method

    method = build_method(AlgoConfig(method="lapo_stage1"))
    step_ids = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1], [0, 0, -1, -1], [0, 1, 1, -1]])
    r = GroupedRollouts(group_ids=torch.tensor([0, 0, 1, 1]), correct=torch.tensor([True, True, False, True]),
                        response_lengths=(step_ids >= 0).sum(1), step_ids=step_ids, response_mask=step_ids >= 0,
                        truncated=torch.zeros(4, dtype=torch.bool), prompt_keys=["a", "a", "b", "b"])
    method.compute(r)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"method_state": method.state_dict()}, lambda d: d.mkdir(parents=True))
    back = build_method(AlgoConfig(method="lapo_stage2"))
    back.load_state_dict(mgr.load(mgr.latest(), restore_rng=False)["method_state"])
    assert back.state_dict() == json.loads(json.dumps(method.state_dict()))
    assert back.prepare_prompt("Q <think>", "a") != "Q <think>"  # stage 2 states the learned budget


def test_scpo_eval_on_an_hf_dir(tmp_path, monkeypatch):
    """`scpo eval --hf DIR`: no Megatron, writes eval/<label>.json with the synthetic-task columns; the prompts
    are encoded once (the length check's ids are the ones generated from)."""
    from megatron_scpo.data.tiny_model import init_tiny_model
    from megatron_scpo.trainer import evaluate
    from megatron_scpo.trainer.eval_cli import main as eval_main

    calls = []
    encode = evaluate.encode_eval_prompts
    monkeypatch.setattr(evaluate, "encode_eval_prompts", lambda *a: calls.append(len(a[2])) or encode(*a))

    model = init_tiny_model(tmp_path / "m", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            head_dim=32)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: synthetic, template: synthetic, synthetic: {n_eval: 4}}\n"
                   "rollout: {max_new_tokens: 12}\neval: {n_prompts: 3, n_samples: 2, pass_k: [1, 2]}\n")
    assert eval_main([str(cfg), "--hf", str(model), "--label", "tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "eval" / "tiny.json").read_text())
    assert res["n_prompts"] == 3 and res["n_samples"] == 6 and set(res["pass@k"]) == {"1", "2"}
    assert res["mean_tokens"] <= 12 and "critical_tokens" in res and "per_difficulty" in res
    assert calls == [3]
