"""DAPO overlong filtering through the real loss path: the trainer's ``train_on`` -> MegatronPolicy.train_step.

Issue 11 item 2: one finished 4-token sample at advantage +1 and one 12-token truncated sample. With the
ratio at 1 (old log-probs = the current ones) the token-mean policy loss is ``-sum(A) / #tokens``:
zeroing the truncated sample's advantage (the old ``rl.overlong_reward: zero_advantage``) still counts its
12 tokens in the denominator, -4 / 16 = -0.25; masking it out (``rl.overlong_filter``) gives -4 / 4 = -1.0.
The k3 KL term must also see only the finished sample's tokens. Run at DP=1 and DP=2 (the truncated row
then sits alone on rank 1, which contributes nothing), on 2 gloo ranks.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from backend_ref import make_policy, policy_fn
from dist_utils import spawn

pytestmark = [pytest.mark.distributed]


def _k3(d: float) -> float:
    """k3 = exp(ref - logp) - (ref - logp) - 1, by hand."""
    return math.exp(d) - d - 1.0


def _worker(rank: int, world: int, out: str) -> None:
    import torch

    from megatron_scpo.trainer.batching import pad_batch
    from megatron_scpo.trainer.rl import train_on
    from megatron_scpo.trainer.runtime import Runtime

    pol = make_policy("qwen3", mbs=1, lr=0.0)  # lr 0: every call sees the same weights (ratio 1)
    rt = SimpleNamespace(policy=pol)
    rt.train_step = lambda batch, loss_fn, mbs: Runtime.train_step(rt, batch, loss_fn, mbs)
    packed = pad_batch([[5, 6, 7, 8], [9, 10, 11, 12]], [list(range(20, 24)), list(range(30, 42))], pad_id=0)
    finished_adv, truncated_adv = 1.0, -1.0  # the truncated one graded wrong; zeroed in the "old" run
    old = pol.compute_logprobs(packed.input_ids, packed.attention_mask)
    B, S = packed.input_ids.shape
    adv_rows = torch.tensor([[finished_adv], [truncated_adv]]).expand(B, S)
    tensors = {"old_logprobs": old, "eps_low": torch.full((B,), 0.2), "eps_high": torch.full((B,), 0.2)}
    token_mean = policy_fn(agg="token-mean")
    truncated = torch.tensor([False, True])
    res = {}
    # the old behaviour: advantages zeroed, tokens left in the mask
    zeroed = torch.where(truncated[:, None], torch.zeros(B, S), adv_rows) * packed.loss_mask
    m = train_on(rt, packed.train_batch(**tensors, advantages=zeroed), token_mean, 1, 2)
    res["zeroed"] = m["loss"]
    # overlong filtering: the truncated row leaves the loss mask
    adv = adv_rows * packed.loss_mask
    m = train_on(rt, packed.train_batch(**tensors, advantages=adv), token_mean, 1, 2, sample_mask=~truncated)
    res["masked"] = m["loss"]
    res["tokens"] = m["train/num_tokens"]
    # with the k3 KL to a reference 0.3 nats above on the finished tokens and 2.0 on the truncated ones
    ref = old + torch.where(truncated[:, None], torch.full((B, S), 2.0), torch.full((B, S), 0.3)) * packed.loss_mask
    m = train_on(rt, packed.train_batch(**tensors, advantages=adv, ref_logprobs=ref), policy_fn(kl_coef=0.5), 1, 2,
                 sample_mask=~truncated)
    res["kl_loss"], res["kl"] = m["loss"], m["kl/mean"]
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):  # only the finished sequence counts
        m = train_on(rt, packed.train_batch(**tensors, advantages=adv), policy_fn(agg=agg, norm_length=20), 1, 2,
                     sample_mask=~truncated)
        res[agg] = m["loss"]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)


@pytest.mark.parametrize("world", [1, 2])
def test_overlong_filter_removes_truncated_tokens_from_loss_denominator_and_kl(tmp_path, world):
    out = tmp_path / "res.json"
    spawn(_worker, world_size=world, args=(str(out),))
    res = json.loads(out.read_text())
    assert res["zeroed"] == pytest.approx(-4 / 16, abs=1e-5)  # the fault: 12 truncated tokens in the denominator
    assert res["masked"] == pytest.approx(-1.0, abs=1e-5)  # loss = -A * ratio, token-mean over 4 tokens
    assert res["tokens"] == 4
    assert res["kl_loss"] == pytest.approx(-1.0 + 0.5 * _k3(0.3), abs=1e-5)  # k3 of the finished tokens only
    assert res["kl"] == pytest.approx(_k3(0.3), abs=1e-5)
    assert res["seq-mean-token-mean"] == pytest.approx(-1.0, abs=1e-5)
    assert res["seq-mean-token-sum-norm"] == pytest.approx(-4 / (1 * 20), abs=1e-5)  # 1 non-empty row x norm 20
