"""Interrupt stage 2, restart with the same run dir: the run continues exactly.

Real `scpo train` processes on one short config. A runs uninterrupted (once, shared by the tests).
B is killed with SIGKILL as soon as it has logged RL step 3 (checkpoints every 2 steps, so B dies
between checkpoints with metrics written after the last one). C gets SIGTERM (graceful preemption)
with periodic checkpoints off (`checkpoint.interval=0`, an override after the options): it must
finish its step, write a checkpoint of exactly that position and exit with 143. D gets SIGTERM in the
middle of the warm-start SFT (no periodic SFT checkpoints): it must checkpoint its SFT position (data
order, LR schedule step) and exit with 143. Restarted, B's, C's and D's final metrics.jsonl must equal
A's record by record (data order via the logged prompt ids, rewards, losses, log-prob diffs, SFT losses
and learning rates; only wall-clock timings differ).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

CONFIG = """
name: resume
tiny_model: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2,
             num_key_value_heads: 2, head_dim: 32, max_position_embeddings: 256}
data:
  source: synthetic
  template: synthetic
  max_prompt_tokens: 48
  synthetic: {n_train: 16, n_eval: 4, max_ops: 2}
warmstart: {enabled: true, steps: 8, batch_size: 4, micro_batch_size: 4, lr: 1.0e-3, warmup_steps: 2, log_every: 1,
            checkpoint_interval: 0}
rollout: {n_samples: 3, max_new_tokens: 24, check_num_sequences: 1, check_seq_len: 8}
# The barely warm-started model answers nothing: every group is all-wrong, which carries no correctness signal
# for any method (SCPO gives such groups zero advantage); GRPO with DAPO's soft overlong penalty still trains.
algo: {method: grpo, segmentation: {min_step_tokens: 1}, overlong: {enabled: true, cache_length: 16}}
optim: {lr: 1.0e-3}
rl: {steps: 6, prompts_per_step: 3, micro_batch_size: 3, mini_batches: 1}
eval: {enabled: false}
checkpoint: {interval: 2, keep: 2}
logging: {tensorboard: false, progress: false}
"""
VOLATILE = ("time/", "perf/")


def _cmd(cfg: str, run_dir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_scpo.cli", "train", cfg, "--run-dir", run_dir, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _records(run_dir) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def _stable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith(VOLATILE)}


def _interrupt_mid_stage2(cmd: list[str], run_dir, sig: int, after_step: int, stage: str = "rl/grpo") -> subprocess.Popen:
    """Start ``cmd`` and send ``sig`` as soon as it has logged ``stage`` step ``after_step``; output goes to files
    next to the run dir (a pipe could be held open by the trainer's helper processes after a SIGKILL)."""
    log = run_dir.parent / f"{run_dir.name}.out"
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=err)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(r["stage"] == stage and r["step"] >= after_step for r in _records(run_dir)):
            os.kill(proc.pid, sig)
            break
        time.sleep(0.02)
    return proc


def _assert_same_metrics(ra: list[dict], rb: list[dict]) -> None:
    assert [(r["stage"], r["step"]) for r in ra] == [(r["stage"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        sx, sy = _stable(x), _stable(y)
        assert sx.keys() == sy.keys()
        for k in sx:
            if isinstance(sx[k], float):
                assert sx[k] == pytest.approx(sy[k], rel=1e-6, abs=1e-9), (x["stage"], x["step"], k)
            else:
                assert sx[k] == sy[k], (x["stage"], x["step"], k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(config path, records of the uninterrupted run A)."""
    root = tmp_path_factory.mktemp("resume")
    cfg = root / "resume.yaml"
    cfg.write_text(CONFIG)
    subprocess.run(_cmd(str(cfg), str(root / "a")), env=_env(), check=True, capture_output=True, timeout=300)
    ra = _records(root / "a")
    rl_a = [r for r in ra if r["stage"] == "rl/grpo"]
    assert len(rl_a) == 6 and len({tuple(r["data/prompt_ids"]) for r in rl_a}) > 1
    assert any(abs(r["loss"]) > 0 for r in rl_a)  # the steps really train
    return cfg, ra


@pytest.mark.slow
def test_sigkill_mid_stage2_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    cfg, ra = uninterrupted
    b = tmp_path / "b"
    proc = _interrupt_mid_stage2(_cmd(str(cfg), str(b)), b, signal.SIGKILL, after_step=3)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"B was not killed mid-run (rc {proc.returncode})"
    killed_at = max(r["step"] for r in _records(b) if r["stage"] == "rl/grpo")
    assert killed_at < 6
    assert (b / "checkpoints" / "latest").read_text().strip().startswith("step_")

    resumed = subprocess.run(_cmd(str(cfg), str(b)), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] step_" in resumed.stdout
    _assert_same_metrics(ra, _records(b))


@pytest.mark.slow
def test_sigterm_mid_stage2_checkpoints_exits_143_and_resumes_exactly(tmp_path, uninterrupted):
    from megatron_scpo.trainer.preempt import PREEMPTED_EXIT_CODE

    cfg, ra = uninterrupted
    c = tmp_path / "c"
    cmd = _cmd(str(cfg), str(c), "checkpoint.interval=0")  # only the stop can write a mid-stage checkpoint
    proc = _interrupt_mid_stage2(cmd, c, signal.SIGTERM, after_step=2)
    proc.wait(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE == 143, (tmp_path / "c.err").read_text()[-3000:]
    assert "[stop]" in (tmp_path / "c.out").read_text()
    reached = max(r["step"] for r in _records(c) if r["stage"] == "rl/grpo")
    assert 3 <= reached < 6  # the step running at SIGTERM was finished
    latest = (c / "checkpoints" / "latest").read_text().strip()
    state = json.loads((c / "checkpoints" / latest / "trainer_state.json").read_text())
    assert latest.startswith("step_") and state["phase"] == "rl/grpo" and state["rl_step"] == reached
    assert state["metrics_records"] == len(_records(c))  # nothing logged after the checkpoint

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[resume] {latest}" in resumed.stdout
    _assert_same_metrics(ra, _records(c))


@pytest.mark.slow
def test_sigterm_mid_warmstart_checkpoints_sft_position_and_resumes_exactly(tmp_path, uninterrupted):
    cfg, ra = uninterrupted
    d = tmp_path / "d"
    cmd = _cmd(str(cfg), str(d))
    proc = _interrupt_mid_stage2(cmd, d, signal.SIGTERM, after_step=1, stage="warmstart")
    proc.wait(timeout=120)
    assert proc.returncode == 143, (tmp_path / "d.err").read_text()[-3000:]
    ws = [r for r in _records(d) if r["stage"] == "warmstart"]
    assert not any(r["stage"].startswith("rl/") for r in _records(d))
    done = len(ws)  # log_every 1: one record per finished SFT step
    assert 2 <= done < 8, "the stop did not land inside the warm start"
    latest = (d / "checkpoints" / "latest").read_text().strip()
    state = json.loads((d / "checkpoints" / latest / "trainer_state.json").read_text())
    assert latest.startswith("step_") and state["phase"] == "warmstart" and state["done"] == []
    sft = state["data"]["sft"]
    assert sft["stage"] == "warmstart" and sft["step"] == done == state["global_step"]
    # 16 sequences, batch 4: the pending order is the rest of the current epoch's permutation
    assert len(sft["order"]) == (16 - 4 * done) % 16 and len(set(sft["order"])) == len(sft["order"])
    assert state["metrics_records"] == len(_records(d))

    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[resume] {latest}" in resumed.stdout
    rd = _records(d)
    assert [r["lr"] for r in rd if r["stage"] == "warmstart"] == [r["lr"] for r in ra if r["stage"] == "warmstart"]
    _assert_same_metrics(ra, rd)


@pytest.mark.slow
def test_sigkill_with_dynamic_sampling_resumes_exactly(tmp_path):
    """Dynamic sampling draws a data-dependent number of prompts per step: the data position and the per-round
    seeds must still make a SIGKILLed run continue exactly (same prompts drawn, same metrics)."""
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(CONFIG)
    over = ("rl.dynamic_sampling=true", "rl.dynamic_sampling_max_draws=2", "rl.truncated_grading=grade")
    subprocess.run(_cmd(str(cfg), str(tmp_path / "a"), *over), env=_env(), check=True, capture_output=True,
                   timeout=300)
    ra = _records(tmp_path / "a")
    rl_a = [r for r in ra if r["stage"] == "rl/grpo"]
    assert len(rl_a) == 6 and all(r["rollout/draws"] >= 1 for r in rl_a)
    drawn = [len(r["data/prompt_ids"]) for r in rl_a]
    assert drawn == [3 * r["rollout/draws"] for r in rl_a] and sum(drawn) > 18  # some step drew a second round
    b = tmp_path / "b"
    proc = _interrupt_mid_stage2(_cmd(str(cfg), str(b), *over), b, signal.SIGKILL, after_step=3)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"B was not killed mid-run (rc {proc.returncode})"
    resumed = subprocess.run(_cmd(str(cfg), str(b), *over), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] step_" in resumed.stdout
    _assert_same_metrics(ra, _records(b))
