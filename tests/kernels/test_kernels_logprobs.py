"""Fused log-probs (+ entropy): Triton (interpreted) and torch paths vs a float64 log_softmax reference."""

from __future__ import annotations

import pytest
import torch
from dist_utils import spawn
from kernels_refs import logprobs_ref
from scpo_kernels import INTERPRET, LAUNCHES, NonFiniteError, fused_logprobs, linear_logprobs

BF16_RTOL = 2e-2


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, ref = got.double(), ref.double()
    if dtype == torch.bfloat16:  # relative to the tensor's scale (bf16 grads are rounded to 8 bits)
        err = (got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)
        assert err <= BF16_RTOL, f"{what}: rel err {err:.3g}"
    else:
        err = (got - ref).abs().max()
        assert err <= 1e-5, f"{what}: abs err {err:.3g}"


def _nan_padded(x: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """x as a row-strided view into a NaN-filled wider buffer: any out-of-bounds read shows up as NaN."""
    buf = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]]


CASES = [  # (N, V, block_v / chunk_size, splits, temperature)
    (4, 1000, 256, 1, 1.0),
    (7, 3001, 1024, 3, 0.7),  # V not a multiple of the block, 2-D split-V grid
    (3, 5003, 8192, 1, 1.3),  # block larger than V
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}V{c[1]}")
def test_logprobs_match_reference(impl, dtype, case):
    n, v, block, splits, temp = case
    g = torch.Generator().manual_seed(n * v)
    x0 = (torch.randn(n, v, generator=g) * 4).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[1] = -100  # ignored row: logp 0, no logp gradient
    x = _nan_padded(x0).requires_grad_()
    lp, ent = fused_logprobs(x, targets, temperature=temp, return_entropy=True, impl=impl, block_v=block,
                             chunk_size=block, splits=splits)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (lp * g_lp + ent * g_ent).sum().backward()

    xr = x0.detach().double().requires_grad_()
    lr, er = logprobs_ref(xr, targets, temp)
    (lr * g_lp.double() + er * g_ent.double()).sum().backward()
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and x.grad.dtype == dtype
    assert lp[1] == 0
    _close(lp, lr, torch.float32, "logp")  # forward is fp32 math on the same (rounded) inputs
    _close(ent, er, torch.float32, "entropy")
    _close(x.grad, xr.grad, dtype, "grad")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logprob_only_and_entropy_only_backward(impl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 777, generator=g, requires_grad=True)
    t = torch.randint(0, 777, (5,), generator=g)
    lp, none = fused_logprobs(x, t, impl=impl, block_v=256, chunk_size=200)
    assert none is None
    lp.sum().backward()
    xr = x.detach().double().requires_grad_()
    logprobs_ref(xr, t)[0].sum().backward()
    _close(x.grad, xr.grad, torch.float32, "logp-only grad")

    x.grad = None
    _, ent = fused_logprobs(x, t, return_entropy=True, impl=impl, block_v=256, chunk_size=200)
    ent.sum().backward()
    xr.grad = None
    logprobs_ref(xr, t)[1].sum().backward()
    _close(x.grad, xr.grad, torch.float32, "entropy-only grad")


def test_qwen_vocab_triton_bf16():
    """Realistic V = 151936 (Qwen) with bf16 logits, kept small in N for the interpreter."""
    g = torch.Generator().manual_seed(2)
    n, v = 6, 151936
    x = (torch.randn(n, v, generator=g) * 3).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    lp, ent = fused_logprobs(x, t, return_entropy=True, impl="triton", block_v=32768)
    (lp.sum() + 0.5 * ent.sum()).backward()
    xr = x.detach().double().requires_grad_()
    lr, er = logprobs_ref(xr, t)
    (lr.sum() + 0.5 * er.sum()).backward()
    _close(lp, lr, torch.float32, "logp")
    _close(ent, er, torch.float32, "entropy")
    _close(x.grad, xr.grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_inplace_backward_equals_out_of_place(impl):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 999, generator=g)
    t = torch.randint(0, 999, (4,), generator=g)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        x = leaf * 1.0  # non-leaf logits, like a LM-head output
        x.retain_grad()
        lp, ent = fused_logprobs(x, t, return_entropy=True, impl=impl, block_v=256, chunk_size=300,
                                 inplace_backward=inplace)
        (lp.sum() - ent.sum()).backward()
        grads.append(leaf.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_triton_path_really_runs_in_interpreter():
    assert INTERPRET, "tests must run with TRITON_INTERPRET=1 (tests/conftest.py) or Triton is untested"
    before = LAUNCHES.get("logprobs_fwd", 0), LAUNCHES.get("logprobs_bwd", 0)
    x = torch.randn(2, 300, requires_grad=True)
    fused_logprobs(x, torch.tensor([1, 2]), impl="triton", block_v=128)[0].sum().backward()
    assert (LAUNCHES["logprobs_fwd"], LAUNCHES["logprobs_bwd"]) == (before[0] + 1, before[1] + 1)
    before_fwd = LAUNCHES["logprobs_fwd"]
    fused_logprobs(x, torch.tensor([1, 2]))  # auto on CPU -> torch path
    assert LAUNCHES["logprobs_fwd"] == before_fwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_logprobs_match_reference(dtype):
    g = torch.Generator().manual_seed(4)
    n, h, v = 9, 16, 1001
    hid = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    lp, ent = linear_logprobs(hid, w, t, temperature=0.9, chunk_size=300, return_entropy=True)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    (lp * g_lp + ent * g_ent).sum().backward()
    hr, wr = hid.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lr, er = logprobs_ref(hr @ wr.T, t, 0.9)
    (lr * g_lp.double() + er * g_ent.double()).sum().backward()
    _close(lp, lr, dtype, "logp")  # bf16: the logits themselves are bf16 matmul outputs
    _close(ent, er, dtype, "entropy")
    _close(hid.grad, hr.grad, dtype, "grad hidden")
    _close(w.grad, wr.grad, dtype, "grad weight")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_raises_before_work(impl):
    x = torch.randn(3, 50)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"targets\[1\] = 50 is out of range"):
        fused_logprobs(x, torch.tensor([0, 50, 1]), impl=impl)
    with pytest.raises(ValueError, match="out of range"):
        fused_logprobs(x, torch.tensor([0, -3, 1]), impl=impl)
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        fused_logprobs(x, torch.tensor([0, 1]), impl=impl)
    with pytest.raises(ValueError, match="empty input"):
        fused_logprobs(torch.randn(0, 50), torch.zeros(0, dtype=torch.long), impl=impl)
    with pytest.raises(ValueError, match="integer"):
        fused_logprobs(x, t.float(), impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(x, t, temperature=0.0, impl=impl)
    with pytest.raises(ValueError, match="2-D"):
        fused_logprobs(x[None], t, impl=impl)
    bad = x.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite.*row 2"):  # its own class, still a ValueError
        fused_logprobs(bad, t, impl=impl)
    assert issubclass(NonFiniteError, ValueError)
    with pytest.raises(ValueError, match="impl"):
        fused_logprobs(x, t, impl="cuda")
    if impl == "triton":
        with pytest.raises(ValueError, match="contiguous last dim"):
            fused_logprobs(torch.randn(50, 3).T, t, impl="triton")
        with pytest.raises(ValueError, match="power of 2"):
            fused_logprobs(x, t, impl="triton", block_v=1000)
    with pytest.raises(ValueError, match="expected \\[V_local, 4\\]"):
        linear_logprobs(torch.randn(3, 4), torch.randn(10, 5), t)
    with pytest.raises(ValueError, match="empty"):
        linear_logprobs(torch.randn(0, 4), torch.randn(10, 4), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# vocab-parallel over a real 2-process gloo group: one launch checks every path
# ---------------------------------------------------------------------------------------------------
def _tp_worker(rank: int, world: int, n: int, v: int, h: int) -> None:
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    full = torch.randn(n, v, generator=g) * 3
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = -100
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    hid = torch.randn(n, h, generator=g)
    wfull = torch.randn(v, h, generator=g) * 0.3
    vl = v // world
    sl = slice(rank * vl, (rank + 1) * vl)
    group = dist.group.WORLD
    for impl in ("torch", "triton"):
        for temp in (1.0, 0.8):
            single = full.clone().requires_grad_()
            lp1, e1 = fused_logprobs(single, t, temperature=temp, return_entropy=True, impl=impl, block_v=512,
                                     chunk_size=400)
            (lp1 * g_lp + e1 * g_ent).sum().backward()
            shard = full[:, sl].clone().requires_grad_()
            lp2, e2 = fused_logprobs(shard, t, temperature=temp, return_entropy=True, tp_group=group, impl=impl,
                                     block_v=512, chunk_size=400)
            (lp2 * g_lp + e2 * g_ent).sum().backward()
            torch.testing.assert_close(lp2, lp1, rtol=0, atol=1e-5)
            torch.testing.assert_close(e2, e1, rtol=0, atol=1e-5)
            torch.testing.assert_close(shard.grad, single.grad[:, sl], rtol=0, atol=1e-5)
    # LM-head variant: the hidden gradient is all-reduced, the weight gradient stays sharded
    h1, w1 = hid.clone().requires_grad_(), wfull.clone().requires_grad_()
    lp1, e1 = linear_logprobs(h1, w1, t, return_entropy=True, chunk_size=300)
    (lp1 * g_lp + e1 * g_ent).sum().backward()
    h2, w2 = hid.clone().requires_grad_(), wfull[sl].clone().requires_grad_()
    lp2, e2 = linear_logprobs(h2, w2, t, return_entropy=True, chunk_size=300, tp_group=group)
    (lp2 * g_lp + e2 * g_ent).sum().backward()
    torch.testing.assert_close(lp2, lp1, rtol=0, atol=1e-5)
    torch.testing.assert_close(e2, e1, rtol=0, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad[sl], rtol=0, atol=1e-5)
    # out-of-range is judged against the global vocab, identically on every rank
    try:
        fused_logprobs(full[:, sl], torch.full((n,), v), tp_group=group)
    except ValueError as e:
        assert f"[0, {v})" in str(e)
    else:
        raise AssertionError("out-of-range target not rejected")


@pytest.mark.distributed
def test_vocab_parallel_gloo_equals_single_process():
    spawn(_tp_worker, world_size=2, args=(6, 2002, 8))
