"""Shared pieces of the trainer's multi-rank tests: the tiny RL config and the TP=1 / TP=2 runner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_utils import spawn

# A 2-layer model on 2-operation synthetic problems: 3 prompts x 4 samples x 20 new tokens per step. A random
# model never closes its think block within 20 tokens, so these tests grade the whole text (their verifier
# stubs decide correctness); the truncated-grading default has its own tests (test_trainer_verify.py).
TINY_RL = [
    "data.source=synthetic", "data.template=synthetic", "data.max_prompt_tokens=48", "data.synthetic.n_train=32",
    "data.synthetic.n_eval=4", "data.synthetic.max_ops=2", "tiny_model.hidden_size=64",
    "tiny_model.intermediate_size=128", "tiny_model.num_hidden_layers=2", "tiny_model.num_attention_heads=2",
    "tiny_model.num_key_value_heads=2", "tiny_model.head_dim=32", "tiny_model.max_position_embeddings=256",
    "rollout.n_samples=4", "rollout.max_new_tokens=20", "rollout.check_num_sequences=2", "rollout.check_seq_len=12",
    "rl.prompts_per_step=3", "rl.micro_batch_size=4", "rl.mini_batches=2", "optim.lr=1e-3",
    "algo.segmentation.min_step_tokens=1", "logging.tensorboard=false", "logging.progress=false",
    "eval.enabled=false", "rl.truncated_grading=grade",
]  # fmt: skip


def parity_correct(text: str, gold: str, **_: Any) -> bool:
    """Stand-in for ``answers.is_correct`` (any extraction mode): even-length responses are right, so groups are
    mixed and deterministic whatever the tiny random model writes."""
    return len(text) % 2 == 0


def run_tp1_and_tp2(worker: Callable[..., None], tmp_path: Path) -> dict[int, Any]:
    """Run ``worker(rank, world, out_json, run_dir)`` at world size 1 then 2; return each run's JSON result."""
    res = {}
    for world in (1, 2):
        out = tmp_path / f"tp{world}.json"
        spawn(worker, world_size=world, args=(str(out), str(tmp_path / f"run{world}")))
        res[world] = json.loads(out.read_text())
    return res
