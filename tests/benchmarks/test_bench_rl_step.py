"""benchmarks/bench_rl_step.py: the padding arithmetic on hand-made batches, and a tiny end-to-end run.

The smoke run (``--tiny``: 2 prompts x 4 samples x 12 tokens, one timed step each) checks that the benchmark
runs and prints its tables, not its numbers (a benchmark, not a timed test). Our half always runs; TRL's half
runs when ``trl`` is installed (``pip install -e '.[bench]'``) and is otherwise skipped with the reason printed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_rl_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_rl_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_rl_step"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_padding_efficiency_by_hand():
    b = _bench()
    # one mini-batch, one rank: rows of 10 and 2 tokens; padded = 12 / (2 x 10); packed rows hold no padding
    eff = b.padding_efficiency([(4, 6), (1, 1)], mini_batches=1, dp=1, budget=12)
    assert eff["padded"] == pytest.approx(0.6)
    assert eff["packed_pp1"] == 1.0 and eff["packed_pp"] == 1.0
    # budget 10: two micro-batches (10 and 2 tokens); under PP both are 10 long
    eff = b.padding_efficiency([(4, 6), (1, 1)], mini_batches=1, dp=1, budget=10)
    assert eff["packed_pp"] == pytest.approx(12 / 20) and eff["micro_batches_per_rank"] == 2
    # two mini-batches are trimmed to their own longest row
    eff = b.padding_efficiency([(4, 6), (1, 1), (1, 2), (1, 2)], mini_batches=2, dp=1, budget=100)
    assert eff["padded"] == pytest.approx(18 / (20 + 6))


def test_length_model_matches_its_parameters():
    import random

    b = _bench()
    m = b.LongCotLengths()
    s = m.sample(200, 8, random.Random(0))
    assert len(s) == 1600 and all(100 <= p <= 300 and 1 <= r <= 16384 for p, r in s)
    mean = sum(r for _, r in s) / len(s)
    assert 4500 < mean < 6500  # log-normal mean 6000 before the 16K cap


def _run(tmp_path, *parts):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--only", *parts, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_padding_and_step_vs_trl(tmp_path):
    stdout, res = _run(tmp_path, "padding", "step")
    assert "Padding efficiency" in stdout and "RL step on CPU" in stdout
    assert 0 < res["padding"]["rows"][0]["padded"] < res["padding"]["rows"][0]["packed_pp1"] <= 1.0
    med = res["step"]["median"]
    ours = med["ours_packed"]
    assert ours["step"] > 0 and ours["response_tokens"] == 2 * 4 * 12
    if res["step"]["skipped_trl"]:
        assert "TRL half skipped" in stdout
    else:
        assert med["trl"]["response_tokens"] == ours["response_tokens"]  # equal work
        assert med["trl"]["prompt_tokens"] == ours["prompt_tokens"]
        assert "ours_packed/trl time" in stdout


@pytest.mark.slow
def test_tiny_padded_vs_packed(tmp_path):
    stdout, res = _run(tmp_path, "packed")
    assert "padded vs packed" in stdout
    med = res["packed"]["median"]  # the same long-tailed batch in both layouts
    assert med["padded"]["tokens"] == med["packed"]["tokens"] and med["packed"]["step"] > 0
