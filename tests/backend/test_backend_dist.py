"""Real megatron-core on 2 gloo ranks: TP=2, PP=2, DP=2 against a single-process HF reference.

One launch runs every scenario (process start-up + `import megatron` dominate the cost). The reference on
each rank is the HF transformers model with the same weights, run on the *whole* global batch in one
process (``backend_ref.py``). bf16, sequence parallelism, virtual pipeline, the non-finite-grad skip and the
step-0 DistOpt save are in ``test_backend_features.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from backend_ref import VOCAB, add_old_logprobs, make_batch, policy_fn, reference, step
from backend_ref import check_grads as _check_grads
from backend_ref import make_policy as _policy
from dist_utils import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _scenarios(rank: int, world: int, tmp: str) -> None:
    from megatron_scpo.backend.checkpoint import CKPT_META
    from megatron_scpo.backend.policy import BatchError

    batch = make_batch()
    add_old_logprobs(batch)
    lp_ref, loss_ref, grads_ref, _ = reference("qwen3", batch, "token-mean", "policy")

    # --- TP=2, Qwen3 (q/k norm, untied, padded vocab 256 split 128/128), DistOpt, 2 micro-batches
    pol = _policy("qwen3", tp=2, pp=1, mbs=2)
    lp = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"], micro_batch_size=3)  # padded to 6
    assert (lp - lp_ref).abs().max().item() < 1e-5
    lp_t = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"], temperature=0.7)
    assert not torch.allclose(lp_t, lp)
    m = step(pol, batch, policy_fn(agg="token-mean"))
    assert m["skipped"] == 0.0 and abs(m["loss"] - loss_ref) < 1e-5, (m, loss_ref)
    assert m["num_tokens"] == float(batch["loss_mask"].sum())
    _check_grads(pol, grads_ref, "tp2", m)
    with pytest.raises(BatchError, match="right-padded"):
        bad = dict(batch, attention_mask=batch["attention_mask"].flip(1))
        step(pol, bad)
    with pytest.raises(BatchError, match="missing fields"):
        step(pol, {k: v for k, v in batch.items() if k != "eps_low"})
    with pytest.raises(BatchError, match="out of range"):
        pol.compute_logprobs(batch["input_ids"] + VOCAB, batch["attention_mask"])
    nan_batch = dict(batch, advantages=batch["advantages"].clone())
    before = [p.detach().clone() for p in pol.modules()[0].parameters()]
    with pytest.raises(BatchError, match="NaN"):
        nan_batch["advantages"][0, 5] = float("nan")
        step(pol, nan_batch)
    assert all(torch.equal(a, b) for a, b in zip(before, pol.modules()[0].parameters()))
    ck = os.path.join(tmp, "ckpt")
    pol.save_shards(ck)
    assert os.path.isfile(os.path.join(ck, CKPT_META)) and os.listdir(tmp) == ["ckpt"]  # no temp dirs: the trainer's
    m2 = step(pol, batch)
    m3 = step(pol, batch, "sft")
    pol.load_shards(ck)  # same layout: exact resume incl. Adam step counters
    m2b = step(pol, batch)
    m3b = step(pol, batch, "sft")
    assert (m2b["loss"], m3b["loss"]) == (m2["loss"], m3["loss"]), (m2, m2b, m3, m3b)

    # --- PP=2 (1F1B, 4 micro-batches), same model: gradients, then resume the TP=2 checkpoint
    pol = _policy("qwen3", tp=1, pp=2, mbs=1)
    lp = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"])
    assert (lp - lp_ref).abs().max().item() < 1e-5
    m = step(pol, batch, policy_fn(agg="token-mean"))
    assert abs(m["loss"] - loss_ref) < 1e-5
    _check_grads(pol, grads_ref, "pp2", m)
    pol.load_shards(ck)  # TP=2 -> PP=2 resharding of model + optimizer
    m2c = step(pol, batch)
    m3c = step(pol, batch, "sft")
    assert abs(m2c["loss"] - m2["loss"]) < 1e-6 and abs(m3c["loss"] - m3["loss"]) < 1e-5, (m2, m2c, m3, m3c)

    # --- a fresh process-like policy (never stepped) resumes the checkpoint at TP=2 again
    pol = _policy("qwen3", tp=2, pp=1, mbs=2)
    pol.load_shards(ck)
    assert step(pol, batch)["loss"] == m2["loss"]

    # --- PP=2 with tied embeddings (Qwen2: qkv bias), SFT loss: the embedding group all-reduce
    lp_ref2, sft_ref, grads_ref2, _ = reference("qwen2", batch, "token-mean", "sft")
    pol = _policy("qwen2", tp=1, pp=2, mbs=2)
    m = step(pol, batch, "sft")
    assert abs(m["loss"] - sft_ref) < 1e-5
    _check_grads(pol, grads_ref2, "pp2-tied", m)

    # --- DP=2 (Llama), seq-mean-token-mean: each rank gets half the batch with unequal token counts;
    # the loss must be the global-batch aggregate, not the mean of per-rank means.
    _, loss_ref3, grads_ref3, _ = reference("llama", batch, "seq-mean-token-mean", "policy")
    norms = []
    for distopt in (False, True):
        pol = _policy("llama", tp=1, pp=1, distopt=distopt, mbs=1)
        half = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
        m = step(pol, half, policy_fn(agg="seq-mean-token-mean"))
        assert abs(m["loss"] - loss_ref3) < 1e-5, (m, loss_ref3)
        norms.append(m["grad_norm"])
        if not distopt:  # DistOpt keeps only this rank's reduce-scattered grad shard: compare the norm
            _check_grads(pol, grads_ref3, "dp2", m)
    assert abs(norms[0] - norms[1]) < 1e-5, norms


def test_backend_tp_pp_dp_against_hf(tmp_path):
    spawn(_scenarios, world_size=2, args=(str(tmp_path),))
