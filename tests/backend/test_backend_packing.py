"""Packed sequences (THD) and token-budget micro-batches: equal to the padded path and to a one-shot HF pass.

Unit tests (no process group): the balanced partition, the token budget, pack/unpack and the block-causal
mask. One 2-process gloo launch: at TP=2 (+SP), PP=2 (1F1B, and x VPP=2) and DP=2 the packed layout, with
and without a token budget, gives the padded layout's log-probs, loss and gradients (fp32: 1e-5; gradients
2e-5 relative to the largest, as the other backend tests) and the HF full-batch reference's. Measured
differences are printed (``pytest -s``) and recorded in docs/backend.md.
"""

from __future__ import annotations

import pytest
import torch
from backend_ref import add_old_logprobs, hf_cfg, hf_model, make_batch, params_as_grads, policy_fn, reference, step
from backend_ref import check_grads as _check_grads
from backend_ref import make_policy as _policy
from dist_utils import spawn

from megatron_scpo.backend.packing import (
    balanced_partition,
    block_causal_mask,
    pack_rows,
    segment_grid,
    token_budget_micro_batches,
)


# ---------------------------------------------------------------------------------------------- units
def test_balanced_partition_beats_first_fit_and_keeps_sizes():
    lengths = [8000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 7000, 500]
    parts = balanced_partition(lengths, 2, equal_size=True)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert [len(p) for p in parts] == [5, 5]
    sums = [sum(lengths[i] for i in p) for p in parts]
    # arrival-order split (every other row / first half) puts 8000 + 7000 together or leaves a large gap
    halves = [sum(lengths[:5]), sum(lengths[5:])]
    assert max(sums) - min(sums) <= 1000 < max(halves) - min(halves)
    free = balanced_partition(lengths, 3)
    assert max(sum(lengths[i] for i in p) for p in free) == 8000  # the longest row alone: optimal
    with pytest.raises(ValueError):
        balanced_partition(lengths, 0)


def test_token_budget_micro_batches_fit_and_are_few():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 1500, (64,), generator=g).tolist()
    budget = 4096
    parts = token_budget_micro_batches(lengths, budget)
    assert sorted(i for p in parts for i in p) == list(range(64))
    sums = [sum(lengths[i] for i in p) for p in parts]
    assert max(sums) <= budget
    lower = -(-sum(lengths) // budget)
    assert len(parts) <= lower + 1, (len(parts), lower)
    # a row over the budget gets a micro-batch of its own; nothing is dropped
    parts = token_budget_micro_batches([5000, 100, 200], 4096)
    assert [5000] in [[[5000, 100, 200][i] for i in p] for p in parts]
    assert token_budget_micro_batches([], 10) == []
    with pytest.raises(ValueError):
        token_budget_micro_batches([1], 0)


def test_pack_rows_unpack_roundtrip_and_mask():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
    am = (torch.arange(4)[None] < torch.tensor([3, 2, 0, 4])[:, None]).long()
    pk = pack_rows(ids, am, pad_id=0, row_len=12)
    assert pk.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 0, 0, 0]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert pk.cu_seqlens.tolist() == [0, 3, 5, 9, 12] and pk.cu_seqlens.dtype == torch.int32
    assert pk.max_seqlen == 4 and pk.lengths == [3, 2, 0, 4] and pk.real_tokens == 9 and pk.total == 12
    assert torch.equal(pk.unpack(pk.input_ids), ids * am)
    x = torch.arange(12.0, requires_grad=True)
    pk.unpack(x[None]).sum().backward()
    assert x.grad.tolist() == [1.0] * 9 + [0.0] * 3  # differentiable; padding gets no gradient
    m = block_causal_mask(pk.cu_seqlens, pk.total)[0, 0]
    assert m.shape == (12, 12)
    assert not m[4, 3] and m[3, 2] and m[5, 4] and not m[8, 5] and m[2, 3]  # causal inside, nothing across
    assert pack_rows(ids, am, multiple_of=4).total == 12
    with pytest.raises(ValueError, match="do not fit"):
        pack_rows(ids, am, row_len=8)


def test_per_sequence_attention_equals_block_diagonal_mask():
    """The CPU THD attention's regrouping (segment_grid + plain causal) == dense block-diagonal causal attention."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 7, 16, 17, 20], dtype=torch.int32)
    t, h, d = 20, 3, 8
    q, k, v = (torch.randn(t, h, d, generator=g) for _ in range(3))
    scores = torch.einsum("thd,shd->hts", q, k).masked_fill(block_causal_mask(cu, t)[0], float("-inf"))
    dense = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
    flat, n, length = segment_grid(cu)
    assert (n, length) == (5, 9) and flat.tolist()[:8] == [0, 1, 2, 3, 4, 9, 10, 18]

    def grid(x):
        return x.new_zeros(n * length, h, d).index_copy(0, flat, x).view(n, length, h, d)

    qg, kg, vg = grid(q), grid(k), grid(v)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    sg = torch.einsum("nthd,nshd->nhts", qg, kg).masked_fill(causal, float("-inf"))
    per_seq = torch.einsum("nhts,nshd->nthd", sg.softmax(-1), vg).reshape(n * length, h, d)[flat]
    assert (per_seq - dense).abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------- 2 ranks
def _grads(pol) -> dict[str, torch.Tensor]:
    with params_as_grads(pol):
        return {n: t.clone() for n, t in pol.named_hf_parameters()}


def _modes(pol, kind: str, batch: dict, agg: str, loss: str, lp_ref, loss_ref, grads_ref, tag: str,
           budget: int, layers: int = 2, rank: int = 0) -> dict[str, float]:
    """padded, packed, packed + token budget on one policy (weights reloaded before each step)."""
    weights = hf_model(hf_cfg(kind, layers)).state_dict()
    out, base = {}, None
    for mode, packed, max_tokens in (("padded", False, None), ("packed", True, None), ("budget", True, budget)):
        pol.packed, pol.max_tokens = packed, max_tokens
        pol.load_hf_weights(weights)
        lp = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"])
        m = step(pol, batch, policy_fn(agg=agg) if loss == "policy" else loss)
        g = _grads(pol)
        if lp_ref is not None:
            assert (lp - lp_ref).abs().max().item() < 1e-5, (tag, mode)
        assert abs(m["loss"] - loss_ref) < 1e-5, (tag, mode, m["loss"], loss_ref)
        if grads_ref is not None:
            _check_grads(pol, grads_ref, f"{tag}-{mode}", m)
        if base is None:
            base = (lp, m, g)
            continue
        d_lp = (lp - base[0]).abs().max().item()
        d_loss = abs(m["loss"] - base[1]["loss"])
        d_norm = abs(m["grad_norm"] - base[1]["grad_norm"]) / max(base[1]["grad_norm"], 1.0)
        scale = max(t.abs().max().item() for t in base[2].values())
        d_grad = max((g[n] - base[2][n]).abs().max().item() for n in g) / max(scale, 1.0)
        assert d_lp < 1e-5 and d_loss < 1e-5 and d_norm < 1e-5 and d_grad < 2e-5, (tag, mode, d_lp, d_loss,
                                                                                    d_norm, d_grad)
        out[f"{tag}/{mode}"] = (d_lp, d_loss, d_norm, d_grad)
        if rank == 0:
            print(f"[packing] {tag} {mode} vs padded: logprobs {d_lp:.1e} loss {d_loss:.1e} "
                  f"grad_norm(rel) {d_norm:.1e} grads(rel) {d_grad:.1e}", flush=True)
    return out


def _scenarios(rank: int, world: int) -> None:
    from megatron_scpo.backend.parallel import destroy_parallel

    batch = make_batch()  # rows of 12, 9, 12, 6 tokens (right padding), one row with a single loss token
    add_old_logprobs(batch)
    lp_ref, loss_ref, grads_ref, _ = reference("qwen3", batch, "token-mean", "policy")

    # TP=2 (Qwen3: q/k norm, head_dim != hidden/heads, vocab split), 2 rows per micro-batch; budget 16 tokens
    pol = _policy("qwen3", tp=2, pp=1, mbs=2, packed=True)
    _modes(pol, "qwen3", batch, "token-mean", "policy", lp_ref, loss_ref, grads_ref, "tp2", 16, rank=rank)
    destroy_parallel()
    # TP=2 + sequence parallelism: packed rows padded to a multiple of TP
    pol = _policy("qwen3", tp=2, pp=1, mbs=2, sp=True, packed=True, max_tokens=20)
    lp = pol.compute_logprobs(batch["input_ids"], batch["attention_mask"])
    assert (lp - lp_ref).abs().max().item() < 1e-5
    m = step(pol, batch)
    assert abs(m["loss"] - loss_ref) < 1e-5
    _check_grads(pol, grads_ref, "tp2-sp-packed", m)
    destroy_parallel()

    # PP=2 (1F1B): 4 micro-batches of one row; the budget gives 3 micro-batches of 12 / 12 / 9+6 tokens,
    # all stages exchanging [15, 1, hidden] (one row length per schedule)
    pol = _policy("qwen3", tp=1, pp=2, mbs=1, packed=True)
    _modes(pol, "qwen3", batch, "token-mean", "policy", lp_ref, loss_ref, grads_ref, "pp2", 16, rank=rank)
    destroy_parallel()

    # PP=2 x VPP=2 (Qwen2 tied, qkv bias, 4 layers), SFT loss
    lp_ref4, sft_ref4, grads_ref4, _ = reference("qwen2", batch, "token-mean", "sft", layers=4)
    pol = _policy("qwen2", tp=1, pp=2, vpp=2, mbs=1, layers=4, packed=True)
    _modes(pol, "qwen2", batch, "token-mean", "sft", lp_ref4, sft_ref4, grads_ref4, "pp2-vpp2", 16, layers=4,
           rank=rank)
    # one row: the interleaved schedule wants a multiple of PP micro-batches, so the budget adds an empty one
    one = {k: v[:1] for k, v in batch.items()}
    lp_one, sft_one, grads_one, _ = reference("qwen2", one, "token-mean", "sft", layers=4)
    pol.load_hf_weights(hf_model(hf_cfg("qwen2", 4)).state_dict())
    pol.packed, pol.max_tokens = True, 100
    assert (pol.compute_logprobs(one["input_ids"], one["attention_mask"]) - lp_one).abs().max().item() < 1e-5
    m = step(pol, one, "sft")
    assert abs(m["loss"] - sft_one) < 1e-5, (m["loss"], sft_one)
    _check_grads(pol, grads_one, "pp2-vpp2-empty-micro-batch", m)
    destroy_parallel()

    # DP=2 (Llama), seq-mean-token-mean: each rank's half has unequal tokens; the loss is the global aggregate
    # and the gradient the one-shot gradient, whatever the micro-batches (budget 10: one row each)
    _, loss_ref3, grads_ref3, _ = reference("llama", batch, "seq-mean-token-mean", "policy")
    half = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
    lp_half = reference("llama", batch, "token-mean", "sft")[0][rank * 2:(rank + 1) * 2]
    pol = _policy("llama", tp=1, pp=1, mbs=2, distopt=False, packed=True)
    _modes(pol, "llama", half, "seq-mean-token-mean", "policy", lp_half, loss_ref3, grads_ref3, "dp2", 10,
           rank=rank)
    destroy_parallel()


@pytest.mark.distributed
@pytest.mark.slow
def test_backend_packed_equals_padded_tp_pp_vpp_dp():
    spawn(_scenarios, world_size=2)
