"""Shared pieces of the backend's 2-rank tests: tiny HF models, a batch, and the single-process HF reference.

The reference is the HF transformers model with the same weights run on the *whole* global batch in one
process: log-probs, the policy / SFT loss (scpo_kernels.policy_loss on the full batch) and its gradients.
Megatron gradients are mapped to HF names with the convert package's streaming export. ``step`` runs
``MegatronPolicy.train_step`` through the production seam: a ``TrainBatch`` and the trainer's loss function.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import torch

VOCAB, S, B = 250, 12, 4


def policy_fn(agg: str = "token-mean", kl_coef: float = 0.0, dual_clip: float | None = None,
              norm_length: int | None = None, tis_cap: float | None = None) -> Any:
    """The trainer's PolicyLoss at temperature 1 (what the HF reference computes)."""
    from megatron_scpo.trainer.loss import PolicyLoss

    return PolicyLoss(agg=agg, norm_length=norm_length, kl_coef=kl_coef, tis_cap=tis_cap, dual_clip=dual_clip,
                      temperature=1.0)


def step(pol: Any, batch: dict[str, torch.Tensor], loss: Any = "policy") -> dict[str, float]:
    """``pol.train_step`` on the batch dict as a TrainBatch; ``loss``: "policy" (token-mean PolicyLoss), "sft"
    (SFTLoss) or a loss function."""
    from megatron_scpo.backend.seam import TrainBatch
    from megatron_scpo.trainer.loss import SFTLoss

    fn = policy_fn() if loss == "policy" else SFTLoss() if loss == "sft" else loss
    return pol.train_step(TrainBatch(**batch), fn)


def hf_cfg(kind: str, layers: int = 2) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen3":
        return Qwen3Config(head_dim=24, tie_word_embeddings=False, **common)
    if kind == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def hf_model(cfg: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # non-trivial norms / biases so their mapping and grads matter
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def make_batch() -> dict[str, torch.Tensor]:
    """B=4 rows: right padding, prompt tokens, one row with a single response token; fp32 old log-probs."""
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


def add_old_logprobs(batch: dict[str, torch.Tensor], kind: str = "qwen3", layers: int = 2) -> None:
    """old_logprobs = the HF model's log-probs + noise (so ratios differ from 1 and clipping happens)."""
    lp0, _, _, _ = reference(kind, batch, "token-mean", "sft", layers)
    noise = 0.1 * torch.randn(B, S, generator=torch.Generator().manual_seed(2))
    batch["old_logprobs"] = lp0 + noise * batch["attention_mask"]


def hf_logprobs(model: Any, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], 1) * am


def reference(kind: str, batch: dict, agg: str, loss: str, layers: int = 2):
    """Full-batch HF forward/backward: (logprobs, loss, {hf_name: grad}, model)."""
    from scpo_kernels import policy_loss

    model = hf_model(hf_cfg(kind, layers))
    lp = hf_logprobs(model, batch["input_ids"], batch["attention_mask"])
    mask = batch["loss_mask"].float()
    if loss == "sft":
        value = -(lp * mask).sum() / mask.sum()
    else:
        value, _ = policy_loss(lp, batch["old_logprobs"], batch["advantages"], mask, batch["eps_low"],
                               batch["eps_high"], agg=agg)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return lp.detach(), float(value), grads, model


def ref_grad_norm(ref_grads: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()


@contextlib.contextmanager
def params_as_grads(policy):
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


def check_grads(policy, ref_grads: dict, tag: str, metrics: dict, clip: float = 1.0, rtol: float = 2e-5) -> float:
    """Megatron grads (clipped in place by the optimizer step) vs the HF grads clipped the same way."""
    norm = ref_grad_norm(ref_grads)
    assert abs(metrics["grad_norm"] - norm) < 1e-5 * max(norm, 1.0), (tag, metrics["grad_norm"], norm)
    coeff = min(1.0, clip / (norm + 1e-6))
    with params_as_grads(policy):
        got = dict(policy.named_hf_parameters())
    assert set(got) <= set(ref_grads), (tag, sorted(set(got) - set(ref_grads)))
    worst = max((got[n] - coeff * ref_grads[n]).abs().max().item() for n in got)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert worst <= rtol * max(scale, 1.0), (tag, worst, scale)
    return worst


def make_policy(kind: str, tp: int = 1, pp: int = 1, *, distopt: bool = True, mbs: int = 1, lr: float = 1e-2,
                layers: int = 2, vpp: int = 1, sp: bool = False, dtype: str = "float32", load: bool = True,
                packed: bool | None = None, max_tokens: int | None = None):
    """A MegatronPolicy with the reference HF weights (``load=False``: megatron's random init instead).

    ``packed``: ``parallel.packed_sequences`` (None: the config default); ``max_tokens``: the token budget.
    """
    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.policy import MegatronPolicy

    optim = SimpleNamespace(lr=lr, weight_decay=0.01, clip_grad=1.0)
    extra = {} if packed is None else {"packed_sequences": packed}
    par = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp, use_distributed_optimizer=distopt,
                         max_tokens_per_micro_batch=max_tokens, **extra)
    pol = MegatronPolicy(hf_cfg(kind, layers), par, optim, dtype=dtype, micro_batch_size=mbs, seed=7)
    if load:
        pol.load_hf_weights(hf_model(hf_cfg(kind, layers)).state_dict())
    return pol
