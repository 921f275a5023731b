"""Real megatron-core on 2 gloo ranks: TP=2, PP=2, DP=2 against a single-process HF reference.

One launch runs every scenario (process start-up + `import megatron` dominate the cost). The reference on
each rank is the HF transformers model with the same weights, run on the *whole* global batch in one
process: log-probs, the policy / SFT loss (scpo_kernels.policy_loss on the full batch) and its gradients.
Megatron gradients are mapped to HF names with the convert package's streaming export.
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
from dist_utils import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, S, B = 250, 12, 4


def _hf_cfg(kind: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen3":
        return Qwen3Config(head_dim=24, tie_word_embeddings=False, **common)
    if kind == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def _hf_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # non-trivial norms / biases so their mapping and grads matter
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 9:] = 0  # right padding
    am[3, 6:] = 0
    lm = am.clone()
    lm[:, :4] = 0  # prompt tokens
    lm[2, 4:] = 0  # a sample with no response tokens
    lm[2, 10] = 1
    return dict(
        input_ids=ids, attention_mask=am, loss_mask=lm,
        advantages=torch.randn(B, S, generator=g), eps_low=torch.tensor([0.1, 0.2, 0.15, 0.3]),
        eps_high=torch.tensor([0.2, 0.28, 0.25, 0.3]),
    )


def _hf_logprobs(model, ids, am):
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], 1) * am


def _reference(kind: str, batch: dict, agg: str, loss: str):
    """Full-batch HF forward/backward: (logprobs, loss, {hf_name: grad})."""
    from megatron_scpo.backend.logprobs import policy_loss

    model = _hf_model(_hf_cfg(kind))
    lp = _hf_logprobs(model, batch["input_ids"], batch["attention_mask"])
    mask = batch["loss_mask"].float()
    if loss == "sft":
        value = -(lp * mask).sum() / mask.sum()
    else:
        value, _ = policy_loss(lp, batch["old_logprobs"], batch["advantages"], mask, batch["eps_low"],
                               batch["eps_high"], agg=agg)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return lp.detach(), float(value), grads, model


@contextlib.contextmanager
def _params_as_grads(policy):
    """Temporarily expose DDP main_grad as parameter data so the HF export streams gradients."""
    saved = []
    for m in policy.modules():
        for p in m.parameters():
            saved.append((p, p.data))
            p.data = p.main_grad.to(p.dtype).view_as(p)
    try:
        yield
    finally:
        for p, d in saved:
            p.data = d


def _check_grads(policy, ref_grads, tag, metrics, clip=1.0):
    """Megatron grads (clipped in place by the optimizer step) vs the HF grads clipped the same way."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
    assert abs(metrics["grad_norm"] - norm) < 1e-5 * max(norm, 1.0), (tag, metrics["grad_norm"], norm)
    coeff = min(1.0, clip / (norm + 1e-6))
    with _params_as_grads(policy):
        got = dict(policy.named_hf_parameters())
    assert set(got) <= set(ref_grads), (tag, sorted(set(got) - set(ref_grads)))
    worst = max((got[n] - coeff * ref_grads[n]).abs().max().item() for n in got)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert worst <= 2e-5 * max(scale, 1.0), (tag, worst, scale)
    return worst


def _policy(kind, tp, pp, distopt=True, mbs=1, lr=1e-2):
    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.policy import MegatronPolicy

    optim = SimpleNamespace(lr=lr, weight_decay=0.01, clip_grad=1.0)
    par = ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=distopt)
    pol = MegatronPolicy(_hf_cfg(kind), par, optim, micro_batch_size=mbs, seed=7)
    pol.load_hf_weights(_hf_model(_hf_cfg(kind)).state_dict())
    return pol


def _scenarios(rank: int, world: int, tmp: str) -> None:
    from megatron_scpo.backend.policy import BatchError

    batch = _batch()
    lp0, _, _, _ = _reference("qwen3", batch, "token-mean", "sft")
    batch["old_logprobs"] = lp0 + 0.1 * torch.randn(B, S, generator=torch.Generator().manual_seed(2)) * batch[
        "attention_mask"]
    lp_ref, loss_ref, grads_ref, _ = _reference("qwen3", batch, "token-mean", "policy")

    # --- TP=2, Qwen3 (q/k norm, untied, padded vocab 256 split 128/128), DistOpt, 2 micro-batches
    pol = _policy("qwen3", tp=2, pp=1, mbs=2)
    lp = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"], micro_batch_size=3)  # padded to 6
    assert (lp - lp_ref).abs().max().item() < 1e-5
    lp_t = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"], temperature=0.7)
    assert not torch.allclose(lp_t, lp)
    m = pol.train_step(batch, "policy", {"agg": "token-mean"})
    assert m["skipped"] == 0.0 and abs(m["loss"] - loss_ref) < 1e-5, (m, loss_ref)
    assert m["num_tokens"] == float(batch["loss_mask"].sum())
    _check_grads(pol, grads_ref, "tp2", m)
    with pytest.raises(BatchError, match="right-padded"):
        bad = dict(batch, attention_mask=batch["attention_mask"].flip(1))
        pol.train_step(bad, "policy")
    with pytest.raises(BatchError, match="missing keys"):
        pol.train_step({k: v for k, v in batch.items() if k != "eps_low"}, "policy")
    with pytest.raises(BatchError, match="out of range"):
        pol.compute_logprobs(batch["input_ids"] + VOCAB, batch["attention_mask"])
    nan_batch = dict(batch, advantages=batch["advantages"].clone())
    before = [p.detach().clone() for p in pol.modules()[0].parameters()]
    with pytest.raises(BatchError, match="NaN"):
        nan_batch["advantages"][0, 5] = float("nan")
        pol.train_step(nan_batch, "policy")
    assert all(torch.equal(a, b) for a, b in zip(before, pol.modules()[0].parameters()))
    ck = os.path.join(tmp, "ckpt")
    pol.save_checkpoint(ck)
    assert os.path.isdir(ck) and not [f for f in os.listdir(tmp) if ".tmp-" in f]
    m2 = pol.train_step(batch, "policy")
    m3 = pol.train_step(batch, "sft")
    pol.load_checkpoint(ck)  # same layout: exact resume incl. Adam step counters
    m2b = pol.train_step(batch, "policy")
    m3b = pol.train_step(batch, "sft")
    assert (m2b["loss"], m3b["loss"]) == (m2["loss"], m3["loss"]), (m2, m2b, m3, m3b)

    # --- PP=2 (1F1B, 4 micro-batches), same model: gradients, then resume the TP=2 checkpoint
    pol = _policy("qwen3", tp=1, pp=2, mbs=1)
    lp = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"])
    assert (lp - lp_ref).abs().max().item() < 1e-5
    m = pol.train_step(batch, "policy", {"agg": "token-mean"})
    assert abs(m["loss"] - loss_ref) < 1e-5
    _check_grads(pol, grads_ref, "pp2", m)
    pol.load_checkpoint(ck)  # TP=2 -> PP=2 resharding of model + optimizer
    m2c = pol.train_step(batch, "policy")
    m3c = pol.train_step(batch, "sft")
    assert abs(m2c["loss"] - m2["loss"]) < 1e-6 and abs(m3c["loss"] - m3["loss"]) < 1e-5, (m2, m2c, m3, m3c)

    # --- a fresh process-like policy (never stepped) resumes the checkpoint at TP=2 again
    pol = _policy("qwen3", tp=2, pp=1, mbs=2)
    pol.load_checkpoint(ck)
    assert pol.train_step(batch, "policy")["loss"] == m2["loss"]

    # --- PP=2 with tied embeddings (Qwen2: qkv bias), SFT loss: the embedding group all-reduce
    lp_ref2, sft_ref, grads_ref2, _ = _reference("qwen2", batch, "token-mean", "sft")
    pol = _policy("qwen2", tp=1, pp=2, mbs=2)
    m = pol.train_step(batch, "sft")
    assert abs(m["loss"] - sft_ref) < 1e-5
    _check_grads(pol, grads_ref2, "pp2-tied", m)

    # --- DP=2 (Llama), seq-mean-token-mean: each rank gets half the batch with unequal token counts;
    # the loss must be the global-batch aggregate, not the mean of per-rank means.
    _, loss_ref3, grads_ref3, _ = _reference("llama", batch, "seq-mean-token-mean", "policy")
    norms = []
    for distopt in (False, True):
        pol = _policy("llama", tp=1, pp=1, distopt=distopt, mbs=1)
        half = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
        m = pol.train_step(half, "policy", {"agg": "seq-mean-token-mean"})
        assert abs(m["loss"] - loss_ref3) < 1e-5, (m, loss_ref3)
        norms.append(m["grad_norm"])
        if not distopt:  # DistOpt keeps only this rank's reduce-scattered grad shard: compare the norm
            _check_grads(pol, grads_ref3, "dp2", m)
    assert abs(norms[0] - norms[1]) < 1e-5, norms


def test_backend_tp_pp_dp_against_hf(tmp_path):
    spawn(_scenarios, world_size=2, args=(str(tmp_path),))
