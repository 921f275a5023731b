"""Registry: every method end to end on a small hand-built batch; outputs finite, shapes right, state survives."""

import pytest
import torch

from megatron_scpo.algo.config import AlgoConfig
from megatron_scpo.algo.registry import GroupedRollouts, Method, ScpoMethod, build_method


def make_batch(correct, lengths, group_ids, steps_per_sample=None, T=None):
    """Each sample: `lengths[b]` response tokens split into equal-ish steps; rest is padding."""
    B = len(correct)
    T = T or max(lengths) + 2
    steps_per_sample = steps_per_sample or [1] * B
    step_ids = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        L, K = lengths[b], steps_per_sample[b]
        ids = [min(t * K // max(L, 1), K - 1) for t in range(L)]
        step_ids[b, :L] = torch.tensor(ids, dtype=torch.long)
    return GroupedRollouts(
        group_ids=torch.tensor(group_ids),
        correct=torch.tensor(correct),
        response_lengths=torch.tensor(lengths),
        step_ids=step_ids,
        response_mask=step_ids >= 0,
        truncated=torch.zeros(B, dtype=torch.bool),
        prompt_keys=[f"q{g}" for g in group_ids],
    )


def test_grpo_hand_computed():
    m = build_method(AlgoConfig(method="grpo"))
    assert isinstance(m, Method) and not m.needs_importance
    r = make_batch([True, False, False, False, True, True], [4, 6, 5, 3, 2, 2], [0, 0, 1, 1, 2, 2])
    out = m.compute(r)
    s = (0.5 ** 0.5) / 1.0  # unbiased std of [1, 0]
    exp = torch.tensor([0.5 / s, -0.5 / s, 0, 0, 0, 0])
    torch.testing.assert_close(out.advantages[:, 0], exp, atol=1e-5, rtol=1e-5)
    assert (out.advantages[~r.response_mask] == 0).all()
    assert (out.advantages[1, :6] == out.advantages[1, 0]).all()
    assert out.metrics["groups/all_wrong_frac"] == pytest.approx(1 / 3)
    assert out.metrics["groups/all_correct_frac"] == pytest.approx(1 / 3)
    assert out.eps_low.shape == (6,) and out.metrics["clip/eps_low_mean"] == pytest.approx(0.2)


def test_grpo_overlong_and_dr_grpo():
    cfg = AlgoConfig(method="grpo")
    cfg.overlong.enabled, cfg.overlong.max_length, cfg.overlong.cache_length = True, 10, 4
    cfg.advantage.scale_std = False
    r = make_batch([True, True], [6, 8], [0, 0])
    out = build_method(cfg).compute(r)
    # rewards 1 + 0 and 1 + (6 - 8)/4 = 0.5 -> mean 0.75
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor([0.25, -0.25]))


def test_global_length_penalty_arora_zanette():
    cfg = AlgoConfig(method="global_length_penalty")
    cfg.length_penalty.alpha = 0.4
    r = make_batch([True, True, False], [2, 6, 9], [0, 0, 0])
    out = build_method(cfg).compute(r)
    # correct lengths 2, 6: mu 4, population sd 2 -> z = -1, +1
    sig = torch.sigmoid(torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out.rewards[:2], 1 - 0.4 * sig)
    assert out.rewards[2] == 0


def test_kimi_reward():
    cfg = AlgoConfig(method="global_length_penalty")
    cfg.length_penalty.style = "kimi"
    r = make_batch([True, False, False], [2, 4, 10], [0, 0, 0])
    out = build_method(cfg).compute(r)
    # lam = 0.5 - (L - 2)/8 -> 0.5, 0.25, -0.5
    torch.testing.assert_close(out.rewards, torch.tensor([1.5, 0.0, -0.5]))


def test_bad_batches_raise():
    m = build_method(AlgoConfig(method="grpo"))
    r = make_batch([True, False], [3, 3], [0, 0])
    r.prompt_keys = ["a"]
    with pytest.raises(ValueError, match="prompt_keys"):
        m.compute(r)
    r = make_batch([True], [3], [0])
    r.correct = torch.tensor([True, False])
    with pytest.raises(ValueError, match="correct"):
        m.compute(r)


def scpo_batch():
    # sample 0 correct: steps of 2 and 6 tokens; sample 1 correct: one 4-token step; sample 2 wrong: 3 x 1 token
    step_ids = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, -1, -1, -1, -1], [0, 1, 2, -1, -1, -1, -1, -1]])
    return GroupedRollouts(
        group_ids=torch.tensor([3, 3, 3]), correct=torch.tensor([True, True, False]),
        response_lengths=torch.tensor([8, 4, 3]), step_ids=step_ids, response_mask=step_ids >= 0,
        truncated=torch.zeros(3, dtype=torch.bool), prompt_keys=["q"] * 3,
        step_importance=[torch.tensor([1.0, 0.0]), torch.tensor([0.5]), None],
    )


def test_scpo_method_end_to_end():
    from megatron_scpo.algo.advantages import s_gae
    from megatron_scpo.algo.rewards.scpo import scpo_step_rewards

    cfg = AlgoConfig(method="scpo")
    cfg.clip.adaptive = True
    cfg.scpo.advantage, cfg.scpo.reduce = "s_gae", "mean"  # DESIGN.md's first form; the summed one is refused
    m = build_method(cfg)
    assert m.needs_importance
    r = scpo_batch()
    out = m.compute(r)
    lengths = torch.tensor([[2, 6, 0], [4, 0, 0], [1, 1, 1]])
    mask = lengths > 0
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    exp_r = scpo_step_rewards(lengths, mask, r.correct, r.group_ids, w, r.response_lengths, cfg.scpo)
    torch.testing.assert_close(out.rewards, (exp_r.sum(1) / mask.sum(1)).float())  # SCPO's mean step reward
    exp_a = s_gae(exp_r, mask, r.group_ids, gamma_lambda=0.5, reduce="mean")
    torch.testing.assert_close(out.advantages[0], torch.tensor([exp_a[0, 0]] * 2 + [exp_a[0, 1]] * 6).float())
    assert (out.advantages[2, 3:] == 0).all()
    # the long unimportant step of the correct response earns less than its important step
    assert exp_r[0, 1] < exp_r[0, 0] and out.advantages[0, 2] < out.advantages[0, 0]
    torch.testing.assert_close(out.eps_low, torch.full((3,), 0.1 + 0.2 * 2 / 3))
    assert all(isinstance(v, float) and v == v for v in out.metrics.values())
    r.step_importance = [None, torch.tensor([0.5]), None]
    with pytest.raises(ValueError, match="sample 0"):
        m.compute(r)
    cfg.scpo.reduce = "sum"
    with pytest.raises(ValueError, match="algo.scpo: advantage s_gae needs reduce: mean"):
        build_method(cfg)  # a hand-built config meets ScpoConfig.validate too


def test_scpo_split_and_critic():
    from megatron_scpo.algo.rewards.scpo import scpo_step_rewards

    cfg = AlgoConfig(method="scpo")
    cfg.scpo.advantage = "split"
    out = build_method(cfg).compute(scpo_batch())
    # the wrong response gets only the outcome part: GRPO on [1, 1, 0]
    s = (1 / 3) ** 0.5
    torch.testing.assert_close(out.advantages[2, :3], torch.full((3,), -(2 / 3) / s), rtol=1e-4, atol=1e-5)
    cfg.scpo.advantage = "critic"
    r = scpo_batch()
    with pytest.raises(ValueError, match="values"):
        build_method(cfg).compute(r)
    r.values = torch.zeros(3, 8)
    out = build_method(cfg).compute(r)
    # critic mode is split with a critic-GAE length part: the wrong response gets the outcome part only; with a
    # zero critic, gamma=1, lam=0.5 the correct one's S_0 = u_0 + 0.5 u_1 over centred correct step rewards u
    torch.testing.assert_close(out.advantages[2, :3], torch.full((3,), -(2 / 3) / s), rtol=1e-4, atol=1e-5)
    lengths = torch.tensor([[2, 6, 0], [4, 0, 0], [1, 1, 1]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    sr = scpo_step_rewards(lengths, lengths > 0, r.correct, r.group_ids, w, r.response_lengths, cfg.scpo)
    u = sr[:2] - (sr[0, 0] + sr[0, 1] + sr[1, 0]) / 3
    bound = 0.9 / (0.5 ** 0.5 + 1e-6)
    exp0 = bound * torch.tanh((u[0, 0] + 0.5 * u[0, 1]) / bound) + (1 / 3) / s
    assert out.advantages[0, 0].item() == pytest.approx(exp0.item(), rel=1e-5)


def test_scpo_default_is_the_measured_split_form():
    """Pins the default: split, gamma*lambda 0.5, summed, len_coef 1, bounded by b = 0.9 / sqrt(1/2) (tanh).

    Hand-computed: one group, correct responses of one 2-token and one 6-token step (importance 1, so the
    step-length term vanishes), one wrong response. Length reward r = 0.75 * (1 - 0.5 sigmoid(-+1)), normalized
    among the two correct steps -> +-1 (population std), bounded to +-b tanh(1/b); outcome GRPO on
    [1, 1, 0] -> 1/sqrt(3), 1/sqrt(3), -2/sqrt(3).
    """
    from megatron_scpo.algo.advantages import broadcast_to_tokens
    from megatron_scpo.algo.config import ScpoConfig

    d = ScpoConfig()
    assert (d.advantage, d.gamma * d.lam, d.reduce, d.len_coef, d.len_gap_frac) == ("split", 0.5, "sum", 1.0, 0.9)
    bound = 0.9 / (0.5 ** 0.5 + 1e-6)  # 0.9 x the smallest GRPO gap (G = 2, unbiased std sqrt(1/2))

    def b(x: float) -> float:
        return bound * torch.tanh(torch.tensor(x / bound)).item()

    step_ids = torch.tensor([[0, 0, -1, -1, -1, -1], [0, 0, 0, 0, 0, 0], [0, 1, 2, -1, -1, -1]])
    r = GroupedRollouts(
        group_ids=torch.zeros(3, dtype=torch.long), correct=torch.tensor([True, True, False]),
        response_lengths=torch.tensor([2, 6, 3]), step_ids=step_ids, response_mask=step_ids >= 0,
        truncated=torch.zeros(3, dtype=torch.bool), prompt_keys=["q"] * 3,
        step_importance=[torch.ones(1), torch.ones(1), None],
    )
    out = build_method(AlgoConfig(method="scpo")).compute(r)
    s3 = 3 ** -0.5
    exp = torch.tensor([[s3 + b(1), s3 + b(1), 0, 0, 0, 0], [s3 + b(-1)] * 6, [-2 * s3] * 3 + [0] * 3])
    torch.testing.assert_close(out.advantages, exp.float(), rtol=1e-4, atol=1e-5)
    # gamma*lambda 0.5 is the default too: the 6-token response as two 3-token steps (same L, same r per step).
    # Correct-step rewards [ra], [rb, rb] normalize to sqrt(2), -1/sqrt(2), -1/sqrt(2); A_0 = rn_1 + 0.5 * rn_2.
    r.step_ids = torch.tensor([[0, 0, -1, -1, -1, -1], [0, 0, 0, 1, 1, 1], [0, 1, 2, -1, -1, -1]])
    r.step_importance = [torch.ones(1), torch.ones(2), None]
    h = 2 ** -0.5
    exp = torch.tensor([[s3 + b(2 * h), 0, 0], [s3 + b(-1.5 * h), s3 + b(-h), 0], [-2 * s3] * 3])
    torch.testing.assert_close(build_method(AlgoConfig(method="scpo")).compute(r).advantages,
                               broadcast_to_tokens(exp, r.step_ids).float(), rtol=1e-4, atol=1e-5)


def test_embedded_configs_use_the_library_scpo_default():
    """tiny_cpu / compare_cpu rely on the default for the measured SCPO form (their explicit setting was removed)."""
    from pathlib import Path

    from megatron_scpo.algo.config import ScpoConfig
    from megatron_scpo.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("tiny_cpu.yaml", "compare_cpu.yaml"):
        assert load_config(root / name).algo.scpo == ScpoConfig(), name


def test_lapo_stages_and_state_roundtrip():
    m1 = build_method(AlgoConfig(method="lapo_stage1"))
    r = make_batch([True, True, True, True, True, False], [100, 200, 300, 400, 500, 50], [0] * 6)
    out = m1.compute(r)
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 1.56, 1.7, 1.56, 1.0, 0.0]))
    state = m1.state_dict()
    assert state["length_map"]["medians"] == {"q0": 300.0}
    m2 = build_method(AlgoConfig(method="lapo_stage2"))
    m2.load_state_dict(state)
    assert m2.prepare_prompt("P <think>", "q0").endswith("<think> I will answer the question with 300 tokens.")
    assert m2.prepare_prompt("P <think>", "new").endswith("with 4096 tokens.")
    other = AlgoConfig(method="lapo_stage2")  # one think-marker setting: segmentation's, also LAPO's insertion point
    other.segmentation.think_open = "<reason>"
    assert build_method(other).prepare_prompt("P <reason>", "new") == "P <reason> I will answer the question with 4096 tokens."
    r = make_batch([True, True, False, True, True], [300, 420, 10, 180, 420], [0, 0, 0, 1, 1])
    r.prompt_keys = ["q0", "q0", "q0", "u", "u"]
    out = m2.compute(r)
    g = 1 + 0.8 * torch.exp(torch.tensor(-0.5)).item()
    torch.testing.assert_close(out.rewards, torch.tensor([1.8, g, 0.0, g, g]))  # unsolved u: target = median 300
    assert m2.length_map.get("q0") == 300.0 and m2.length_map.get("u") == 300.0
    m3 = build_method(AlgoConfig(method="lapo_stage2"))
    m3.load_state_dict(m2.state_dict())
    assert m3.state_dict() == m2.state_dict()
    with pytest.raises(ValueError, match="length_map"):
        m3.load_state_dict({"map": {}})
    m3.load_state_dict({})  # "no saved state": keeps the map
    r.prompt_keys = ["q0", "zz", "q0", "u", "u"]
    with pytest.raises(ValueError, match="mixes"):
        m2.compute(r)


def test_calibration_method():
    m = build_method(AlgoConfig(method="calibration"))
    r = make_batch([True, True, False, False, True, True], [100, 200, 300, 400, 7, 9], [0, 0, 0, 0, 1, 1])
    out = m.compute(r)
    L = 0.5 / (75 - 18.75 + 1e-6)
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 1 - 75 * L, 0.0, 0.0, 1.0, 1.0]))
    a = out.advantages[:, 0]
    assert (a[:2] >= 0).all() and (a[2:4] <= 0).all() and (a[4:] == 0).all()
    assert out.metrics["calib/l_opt_mean"] == pytest.approx((125 + 7) / 2)


def test_every_method_handles_degenerate_groups():
    """All-correct, all-wrong, singleton groups and zero-length responses: finite, defined outputs."""
    for name in ("scpo", "lapo_stage1", "lapo_stage2", "calibration", "grpo", "global_length_penalty"):
        cfg = AlgoConfig(method=name)
        r = make_batch([True, True, False, False, True, False], [3, 5, 4, 0, 6, 2], [0, 0, 1, 1, 2, 3],
                       steps_per_sample=[1, 2, 2, 1, 3, 1])
        r.step_importance = [torch.ones(int(r.step_ids[b].max()) + 1) if r.correct[b] else None for b in range(6)]
        out = build_method(cfg).compute(r)
        assert torch.isfinite(out.advantages).all(), name
        assert (out.advantages[~r.response_mask] == 0).all(), name
        if name in ("grpo", "calibration"):  # no length signal in an all-correct group
            assert out.advantages[1].abs().sum() == 0, name


def _legacy_summed_s_gae(r: GroupedRollouts, lam: float) -> torch.Tensor:
    """Token-mean advantage per response of the refused summed s_gae (kept to measure it, docs table 1/2)."""
    from megatron_scpo.algo.advantages import broadcast_to_tokens, s_gae
    from megatron_scpo.algo.rewards.scpo import scpo_step_rewards
    from megatron_scpo.algo.steps import step_lengths_batch

    lengths, num = step_lengths_batch(r.step_ids)
    mask = torch.arange(lengths.shape[1])[None, :] < num[:, None]
    w = torch.zeros(lengths.shape, dtype=torch.float64)
    for b, v in enumerate(r.step_importance):
        if v is not None:
            w[b, : v.numel()] = v
    sr = scpo_step_rewards(lengths, mask, r.correct, r.group_ids, w, r.response_lengths, AlgoConfig().scpo)
    adv = broadcast_to_tokens(s_gae(sr, mask, r.group_ids, gamma_lambda=lam), r.step_ids)
    return adv.sum(1) / (r.step_ids >= 0).sum(1)


def _per_response(r: GroupedRollouts, adv: str, lam: float, reduce: str, frac: float = 0.9) -> torch.Tensor:
    cfg = AlgoConfig(method="scpo")
    cfg.scpo.advantage, cfg.scpo.lam, cfg.scpo.reduce, cfg.scpo.len_gap_frac = adv, lam, reduce, frac
    # the class, not build_method: the measurements include forms validation refuses (len_gap_frac ~ inf)
    return ScpoMethod(cfg).compute(r).advantages.sum(1) / (r.step_ids >= 0).sum(1)


def test_s_gae_step_count_bias_is_measured_not_assumed():
    """Same total length, more steps: summed S-GAE pays more per extra step (hence refused); mean and split do not."""
    Ks, correct, T = [2, 3, 4, 6, 3, 3, 3, 3], [1, 1, 1, 1, 0, 0, 0, 0], 60
    ids = torch.stack([torch.tensor([t * K // T for t in range(T)]) for K in Ks])
    r = GroupedRollouts(torch.zeros(8, dtype=torch.long), torch.tensor(correct, dtype=torch.bool), torch.full((8,), T),
                        ids, ids >= 0, torch.zeros(8, dtype=torch.bool), ["q"] * 8,
                        [torch.ones(K) if c else None for K, c in zip(Ks, correct)])
    assert (_legacy_summed_s_gae(r, 1.0)[:4].diff() > 0.1).all()  # strictly grows with the number of steps
    for adv, lam, reduce in (("s_gae", 1.0, "mean"), ("s_gae", 0.5, "mean"), ("split", 0.5, "sum")):
        a = _per_response(r, adv, lam, reduce)[:4]
        torch.testing.assert_close(a, a[:1].expand(4), msg=f"{adv} {lam} {reduce}")


def test_split_length_term_vs_outcome_term_is_measured():
    """Correct responses of 2, 4, 6, 8 ten-token steps (importance 1) and four wrong ones (docs table 2).

    Unbounded (the pre-issue-11 form, len_gap_frac ~ inf) with gamma*lambda 1, the summed length advantage of the
    longest correct response outweighs the outcome term: it ends below every wrong response. The bounded default
    keeps correct > wrong for any gamma*lambda while still ranking shorter correct responses higher.
    """
    Ks, correct, S = [2, 4, 6, 8, 3, 3, 3, 3], [1, 1, 1, 1, 0, 0, 0, 0], 10
    ids = torch.stack([torch.where(torch.arange(8 * S) < K * S, torch.arange(8 * S) // S, -1) for K in Ks])
    r = GroupedRollouts(torch.zeros(8, dtype=torch.long), torch.tensor(correct, dtype=torch.bool),
                        torch.tensor([K * S for K in Ks]), ids, ids >= 0, torch.zeros(8, dtype=torch.bool), ["q"] * 8,
                        [torch.ones(K) if c else None for K, c in zip(Ks, correct)])
    default = build_method(AlgoConfig(method="scpo")).compute(r).advantages.sum(1) / (ids >= 0).sum(1)
    torch.testing.assert_close(default, _per_response(r, "split", 0.5, "sum"))
    assert (default[:4].diff() < 0).all() and default[:4].min() > default[4:].max()
    assert _per_response(r, "split", 1.0, "sum", frac=1e9)[3] < default[4:].min()  # the fault, unbounded
    for lam in (1.0, 0.5, 0.0):
        a = _per_response(r, "split", lam, "sum")
        assert (a[:4].diff() < 0).all() and a[:4].min() > a[4:].max(), lam
    sg = _per_response(r, "s_gae", 0.5, "mean")
    assert sg[:4].min() > sg[4:].max()


def test_bad_values_raise_clear_errors():
    m = build_method(AlgoConfig(method="scpo"))
    r = scpo_batch()
    r.step_importance = [torch.tensor([float("nan"), 0.0]), torch.tensor([0.5]), None]
    with pytest.raises(ValueError, match="importance"):
        m.compute(r)
    r.step_importance = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5]), None]
    with pytest.raises(ValueError, match="3 importances"):
        m.compute(r)
    empty = make_batch([True], [2], [0])
    empty.group_ids, empty.correct = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    with pytest.raises(ValueError, match="non-empty"):
        build_method(AlgoConfig(method="grpo")).compute(empty)
    r = make_batch([True, False], [0, 0], [0, 0], T=1)  # every response empty: defined zeros
    r.step_ids, r.response_mask = torch.full((2, 0), -1), torch.zeros(2, 0, dtype=torch.bool)
    r.step_importance = [torch.zeros(0), None]
    for name in ("scpo", "grpo", "calibration"):
        assert build_method(AlgoConfig(method=name)).compute(r).advantages.shape == (2, 0)


def test_config_sections_from_yaml():
    from megatron_scpo import configlib

    cfg = configlib.build(AlgoConfig, {"method": "scpo", "scpo": {"k0": None, "advantage": "split", "lam": 0.9},
                                       "importance": {"mode": "leave_one_out"}, "lapo": {"beta": 0.7}})
    assert cfg.scpo.advantage == "split" and cfg.importance.mode == "leave_one_out" and cfg.lapo.beta == 0.7
    for bad, msg in (({"scpo": {"k1": 2.0}}, "scpo: k1"), ({"scpo": {"advantage": "gae"}}, "scpo.advantage"),
                     ({"lapo": {"budget_template": "no n"}}, "lapo: budget_template"),
                     ({"method": "calibration", "overlong": {"enabled": True}}, "overlong.enabled"),
                     ({"clip": {"adaptive": True, "eps_low_min": 0.3, "eps_low_max": 0.1}},
                      r"eps_low_min \(0.3\) must be <= eps_low_max"),
                     # a key of the other clip mode would do nothing: an error naming it
                     ({"clip": {"adaptive": True, "eps_high": 0.28}}, "clip: eps_high does nothing with adaptive: true"),
                     ({"clip": {"eps_low_min": 0.1}}, "clip: eps_low_min does nothing with adaptive: false"),
                     ({"clip": {"invert": True}}, "clip: invert does nothing without adaptive"),
                     ({"overlong": {"enabled": True, "max_length": 10, "cache_length": 10}},
                      r"cache_length \(10\) must be < max_length \(10")):
        with pytest.raises(configlib.ConfigError, match=msg):
            configlib.build(AlgoConfig, bad)
        if bad != {"scpo": {"advantage": "gae"}}:  # (a Literal: the loader's check, not validate()'s)
            with pytest.raises(ValueError, match=msg):  # build_method runs the same checks on a hand-built config
                build_method(_unchecked(AlgoConfig, bad))


def _unchecked(cls, data):
    """A dataclass tree built from ``data`` without running any ``validate()`` (a hand-built config)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    kw = {k: _unchecked(hints[k], v) if isinstance(v, dict) else v for k, v in data.items()}
    return cls(**kw) if dataclasses.is_dataclass(cls) else data


def test_clip_modes_resolve_their_documented_nulls():
    from megatron_scpo.algo.config import ClipConfig

    assert ClipConfig().fixed() == (0.2, 0.2) and ClipConfig(eps_high=0.28).fixed() == (0.2, 0.28)
    assert ClipConfig(adaptive=True).ranges() == ((0.1, 0.3), (0.1, 0.3))
    assert ClipConfig(adaptive=True, eps_high_max=0.35).ranges() == ((0.1, 0.3), (0.1, 0.35))
