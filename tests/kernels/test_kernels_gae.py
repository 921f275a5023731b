"""S-GAE segmented scan: Triton (interpreted) and vectorized torch paths vs a token-walking Python reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernels_refs import sgae_ref
from scpo_kernels import LAUNCHES, NonFiniteError, discounted_suffix_sum, segmented_gae


def _batch(seed: int, b: int, t: int, p_step: float = 0.25, p_mask: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > p_mask
    mask[0, -5:] = False  # right padding
    if b > 1:
        mask[1, :3] = False  # left padding
    step_ids = torch.cumsum((torch.rand(b, t, generator=g) < p_step).long(), 1)
    boundaries = torch.rand(b, t, generator=g) < p_step
    values = torch.randn(b, t, generator=g)
    seq_ends = torch.rand(b, t, generator=g) < 0.05
    return rewards, mask, step_ids, boundaries, values, seq_ends


VARIANTS = {
    "token": lambda s, bd, v, se: {},
    "token_critic": lambda s, bd, v, se: {"values": v},
    "step_ids": lambda s, bd, v, se: {"step_ids": s},
    "boundaries": lambda s, bd, v, se: {"boundaries": bd},
    "step_critic": lambda s, bd, v, se: {"step_ids": s, "values": v},
    "packed_critic": lambda s, bd, v, se: {"step_ids": s, "values": v, "seq_ends": se},
    "packed_token": lambda s, bd, v, se: {"seq_ends": se},
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape,gl", [((3, 37), (0.9, 0.8)), ((2, 300), (1.0, 0.5)), ((4, 16), (1.0, 1.0))])
def test_sgae_matches_reference(impl, variant, shape, gl):
    r, m, s, bd, v, se = _batch(shape[1], *shape)
    kw = VARIANTS[variant](s, bd, v, se)
    adv, ret = segmented_gae(r, m, gamma=gl[0], lam=gl[1], impl=impl, block_t=16, **kw)
    ar, rr = sgae_ref(r, m, gamma=gl[0], lam=gl[1], **kw)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), rr, rtol=1e-5, atol=1e-5)


def test_all_tokens_of_a_step_share_one_advantage_and_padding_is_zero():
    r, m, s, *_ = _batch(0, 3, 64)
    adv, _ = segmented_gae(r, m, step_ids=s, gamma=1.0, lam=0.5)
    for b in range(3):
        for sid in s[b][m[b]].unique():
            vals = adv[b][(s[b] == sid) & m[b]]
            assert torch.equal(vals, vals[:1].expand_as(vals))
    assert torch.all(adv[~m] == 0)


def test_hand_computed_example():
    # one row: steps [r=1 on token 1], [r=2 on token 3, token 4], masked token 5, [r=4 on token 6]
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 9.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    step_ids = torch.tensor([[0, 0, 1, 1, 1, 7, 2]])
    adv, _ = segmented_gae(rewards, mask, step_ids=step_ids, gamma=1.0, lam=0.5)
    a2 = 4.0
    a1 = 2.0 + 0.5 * a2
    a0 = 1.0 + 0.5 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a0, a1, a1, a1, 0.0, a2]]))


def test_matches_algo_step_level_reverse_sum():
    """Same A_j as the algo core's step-level loop when each step reward sits on the step's last token."""
    from megatron_scpo.algo.advantages import discounted_reverse_sum

    g = torch.Generator().manual_seed(5)
    b, k, per = 4, 6, 5
    step_r = torch.randn(b, k, generator=g)
    step_mask = torch.ones(b, k, dtype=torch.bool)
    step_mask[1, 4:] = False
    ref = discounted_reverse_sum(step_r, step_mask, 0.7)
    step_ids = torch.arange(k).repeat_interleave(per).expand(b, -1)
    rewards = torch.zeros(b, k * per)
    rewards[:, per - 1 :: per] = step_r
    mask = step_mask.repeat_interleave(per, 1)
    for impl in ("torch", "triton"):
        adv, _ = segmented_gae(rewards, mask, step_ids=step_ids, gamma=1.0, lam=0.7, impl=impl, block_t=8)
        torch.testing.assert_close(adv.double(), ref.repeat_interleave(per, 1), rtol=1e-6, atol=1e-6)


@given(
    st.integers(1, 4), st.integers(1, 90), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 10_000),
    st.sampled_from(list(VARIANTS)),
)
def test_sgae_torch_path_property(b, t, gamma, lam, seed, variant):
    r, m, s, bd, v, se = _batch(seed, b, t, p_step=0.3, p_mask=0.3)
    kw = VARIANTS[variant](s, bd, v, se)
    adv, ret = segmented_gae(r, m, gamma=gamma, lam=lam, **kw)
    ar, rr = sgae_ref(r, m, gamma=gamma, lam=lam, **kw)
    torch.testing.assert_close(adv.double(), ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), rr, rtol=1e-5, atol=1e-5)


def test_discounted_suffix_sum_multi_level_blocks():
    g = torch.Generator().manual_seed(6)
    d = torch.randn(3, 5000, generator=g, dtype=torch.float64)
    for gl in (0.0, 0.5, 0.999, 1.0):
        out = discounted_suffix_sum(d, gl, block=16)  # 3 levels of blocks
        ref = torch.zeros_like(d)
        acc = torch.zeros(3, dtype=torch.float64)
        for j in reversed(range(d.shape[1])):
            acc = d[:, j] + gl * acc
            ref[:, j] = acc
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_float64_rewards_stay_float64_and_triton_runs():
    r, m, s, *_ = _batch(1, 2, 20)
    adv, _ = segmented_gae(r.double(), m, step_ids=s, gamma=0.9, lam=0.9)
    assert adv.dtype == torch.float64
    before = LAUNCHES.get("gae_scan", 0)
    segmented_gae(r, m, impl="triton", block_t=16)
    assert LAUNCHES["gae_scan"] == before + 1


def test_bad_input_raises():
    r, m, s, bd, v, _ = _batch(2, 2, 10)
    with pytest.raises(ValueError, match="mask has shape"):
        segmented_gae(r, m[:, :5])
    with pytest.raises(ValueError, match="empty batch"):
        segmented_gae(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        segmented_gae(r, m, step_ids=s, boundaries=bd)
    with pytest.raises(ValueError, match="gamma"):
        segmented_gae(r, m, gamma=1.5)
    with pytest.raises(ValueError, match="step_ids must be an integer"):
        segmented_gae(r, m, step_ids=s.float())
    bad = r.clone()
    bad[m] = float("nan")
    with pytest.raises(NonFiniteError, match="rewards contains NaN"):  # a ValueError the trainer can single out
        segmented_gae(bad, m)
    bad = r.clone()
    bad[~m] = float("nan")  # garbage on padding is ignored
    assert torch.isfinite(segmented_gae(bad, m)[0]).all()
    with pytest.raises(ValueError, match="power of 2"):
        segmented_gae(r, m, impl="triton", block_t=12)


def _padding_only_mask(seed: int, b: int, t: int) -> torch.Tensor:
    """Rows with left and/or right padding but no holes (the dense token-level fast path); one empty row."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, max(t // 3, 1), (b,), generator=g)
    hi = t - torch.randint(0, max(t // 3, 1), (b,), generator=g)
    lo[0] = 0  # a row starting valid
    cols = torch.arange(t)
    mask = (cols >= lo[:, None]) & (cols < hi[:, None])
    if b > 2:
        mask[2] = False
    return mask


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("left_pad", [False, True])
def test_sgae_padding_only_masks(impl, variant, left_pad):
    r, _, s, bd, v, se = _batch(11, 4, 53)
    m = _padding_only_mask(3, 4, 53)
    if not left_pad:  # every row starts valid: the token path skips zeroing the padding
        m = torch.arange(53)[None, :] < m.sum(1, keepdim=True)
    kw = VARIANTS[variant](s, bd, v, se)
    adv, ret = segmented_gae(r, m, gamma=0.95, lam=0.9, impl=impl, block_t=16, **kw)
    ar, rr = sgae_ref(r, m, gamma=0.95, lam=0.9, **kw)
    torch.testing.assert_close(adv.double(), ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), rr, rtol=1e-5, atol=1e-5)
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)


@given(st.integers(1, 4), st.integers(1, 90), st.floats(0.0, 1.0), st.integers(0, 10_000), st.sampled_from(list(VARIANTS)))
def test_sgae_torch_path_property_padding_only(b, t, gl, seed, variant):
    r, _, s, bd, v, se = _batch(seed, b, t, p_step=0.3)
    m = _padding_only_mask(seed, b, t)
    kw = VARIANTS[variant](s, bd, v, se)
    adv, ret = segmented_gae(r, m, gamma=1.0, lam=gl, **kw)
    ar, rr = sgae_ref(r, m, gamma=1.0, lam=gl, **kw)
    torch.testing.assert_close(adv.double(), ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), rr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gl", [0.5, 0.999, 1.0])
def test_sgae_fp32_long_sequences_match_fp64(gl):
    """fp32 math over 4k-token rows stays within 1e-5 (relative) of the float64 reference.

    gamma*lam near 1 accumulates thousands of terms; 0.5 makes powers underflow (a gl^-t rescaling
    would overflow): both must be exact to fp32 precision.
    """
    b, t = 2, 4096
    r, _, s, _, v, _ = _batch(21, b, t, p_step=0.02)
    m = torch.ones(b, t, dtype=torch.bool)
    m[1, :100] = False
    m[1, -300:] = False
    holes = m.clone()
    holes[0, 1000:1010] = False
    for mask, kw in ((m, {"values": v}), (m, {"step_ids": s}), (holes, {"values": v}), (holes, {"step_ids": s})):
        adv, ret = segmented_gae(r, mask, gamma=1.0, lam=gl, **kw)
        ar, rr = sgae_ref(r.double(), mask, gamma=1.0, lam=gl, **kw)
        torch.testing.assert_close(adv.double(), ar, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret.double(), rr, rtol=1e-5, atol=1e-5)


def test_sgae_non_contiguous_inputs():
    r, m, s, _, v, se = _batch(8, 3, 40)

    def strided(x: torch.Tensor) -> torch.Tensor:  # same values, column-major strides
        return x.T.contiguous().T

    assert not strided(r).is_contiguous()
    for mask in (m, _padding_only_mask(1, 3, 40)):
        for kw in ({"step_ids": s, "values": v, "seq_ends": se}, {"values": v}):
            adv, ret = segmented_gae(strided(r), strided(mask), **{k: strided(x) for k, x in kw.items()})
            ar, rr = sgae_ref(r, mask, **kw)
            torch.testing.assert_close(adv.double(), ar, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ret.double(), rr, rtol=1e-5, atol=1e-5)


# --- step_discounted_sum: the scan the trainer injects into the SCPO method (spec: algo's discounted_reverse_sum)


def _step_grid(seed: int, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, generator=g, dtype=torch.float64)
    mask = torch.arange(k)[None, :] < torch.randint(0, k + 1, (b,), generator=g)[:, None]  # contiguous from 0
    return x, mask


@given(st.integers(1, 6), st.integers(0, 128), st.sampled_from([0.0, 0.5, 0.45, 0.999, 1.0]),
       st.sampled_from(["sum", "mean"]), st.integers(0, 10_000))
def test_step_discounted_sum_is_bitwise_the_spec_up_to_128_steps(b, k, decay, reduce, seed):
    """fp64, K <= 128 (the column recurrence): the same floating-point operations as the spec, so equal bits."""
    from scpo_kernels.gae import step_discounted_sum

    from megatron_scpo.algo.advantages import discounted_reverse_sum

    x, mask = _step_grid(seed, b, k)
    assert torch.equal(step_discounted_sum(x, mask, decay, reduce=reduce), discounted_reverse_sum(x, mask, decay,
                                                                                                   reduce=reduce))


@pytest.mark.parametrize("k", [129, 700])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_step_discounted_sum_long_rows_and_triton_match_the_spec(k, reduce):
    """Beyond 128 steps the blocked matmuls (within 1e-12 in fp64); the Triton scan is fp32 (within 1e-5)."""
    from scpo_kernels.gae import step_discounted_sum

    from megatron_scpo.algo.advantages import discounted_reverse_sum

    x, mask = _step_grid(k, 5, k)
    ref = discounted_reverse_sum(x, mask, 0.9, reduce=reduce)
    torch.testing.assert_close(step_discounted_sum(x, mask, 0.9, reduce=reduce), ref, rtol=1e-12, atol=1e-12)
    before = LAUNCHES.get("gae_scan", 0)
    got = step_discounted_sum(x, mask, 0.9, reduce=reduce, impl="triton")
    assert LAUNCHES.get("gae_scan", 0) > before
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_step_discounted_sum_bad_input():
    from scpo_kernels.gae import step_discounted_sum

    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="contiguous from column 0"):
        step_discounted_sum(x, torch.tensor([[True, False, True, False], [True] * 4]), 0.5)
    with pytest.raises(ValueError, match="reduce"):
        step_discounted_sum(x, torch.ones(2, 4, dtype=torch.bool), 0.5, reduce="max")
    with pytest.raises(ValueError, match="step_mask"):
        step_discounted_sum(x, torch.ones(2, 3, dtype=torch.bool), 0.5)
    empty = step_discounted_sum(torch.zeros(3, 0, dtype=torch.float64), torch.zeros(3, 0, dtype=torch.bool), 0.5)
    assert empty.shape == (3, 0) and empty.dtype == torch.float64


def _scpo_rollouts(seed: int, groups: int, g_size: int, max_steps: int):
    """Random SCPO batch: per sample 1..max_steps steps of 1..4 tokens, importance on correct samples, critic values."""
    from megatron_scpo.algo.registry import GroupedRollouts

    gen = torch.Generator().manual_seed(seed)
    b = groups * g_size
    ks = torch.randint(1, max_steps + 1, (b,), generator=gen)
    per_step = [torch.randint(1, 5, (int(k),), generator=gen) for k in ks]
    lengths = torch.stack([p.sum() for p in per_step])
    t = int(lengths.max()) + 3
    step_ids = torch.full((b, t), -1, dtype=torch.long)
    for i, p in enumerate(per_step):
        step_ids[i, : int(lengths[i])] = torch.repeat_interleave(torch.arange(p.numel()), p)
    correct = torch.rand(b, generator=gen) < 0.6
    imp = [torch.rand(int(k), generator=gen, dtype=torch.float64) if c else None for k, c in zip(ks, correct)]
    return GroupedRollouts(
        group_ids=torch.arange(groups).repeat_interleave(g_size), correct=correct, response_lengths=lengths,
        step_ids=step_ids, response_mask=step_ids >= 0, truncated=torch.zeros(b, dtype=torch.bool),
        prompt_keys=[f"q{i // g_size}" for i in range(b)], step_importance=imp,
        values=torch.randn(b, t, generator=gen),
    )


@pytest.mark.parametrize("mode", ["split", "s_gae", "critic"])
@pytest.mark.parametrize("seed", range(4))
def test_scpo_method_with_the_kernel_scan_equals_the_spec(mode, seed):
    """ScpoMethod.compute with the trainer's scan (the kernel) gives the same advantages, rewards and metrics as
    with the spec's: bitwise up to 128 steps (every shipped config's step grid), within 1e-6 beyond (fp64 matmul
    order; the advantages are fp32)."""
    from scpo_kernels.gae import step_discounted_sum

    from megatron_scpo.algo.config import AlgoConfig
    from megatron_scpo.algo.registry import build_method

    cfg = AlgoConfig(method="scpo")
    cfg.scpo.advantage = mode
    if mode == "s_gae":
        cfg.scpo.reduce = "mean"
    for max_steps, exact in ((40, True), (200, False)):
        r = _scpo_rollouts(seed, 4, 6, max_steps)
        spec, kern = build_method(cfg).compute(r), build_method(cfg, scan=step_discounted_sum).compute(r)
        assert spec.advantages.abs().sum() > 0
        if exact:
            assert torch.equal(kern.advantages, spec.advantages) and kern.metrics == spec.metrics
        else:
            torch.testing.assert_close(kern.advantages, spec.advantages, rtol=1e-6, atol=1e-6)
        assert torch.equal(kern.rewards, spec.rewards)
