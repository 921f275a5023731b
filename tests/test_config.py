"""The config loader: typed sections, unknown keys and bad values name the key path."""

import pytest

from megatron_scpo.config import ConfigError, ExperimentConfig, load_config
from megatron_scpo.configlib import build, to_dict


def test_defaults_round_trip():
    cfg = ExperimentConfig()
    assert build(ExperimentConfig, to_dict(cfg)) == cfg


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\nrollout:\n  n_samples: 4\nalgo:\n  method: grpo\n  clip: {eps_high: 0.28}\n")
    cfg = load_config(p, ["rollout.temperature=0.6", "optim.lr=1e-5"])
    assert cfg.rollout.n_samples == 4 and cfg.rollout.temperature == 0.6
    assert cfg.algo.method == "grpo" and cfg.algo.clip.eps_high == 0.28
    assert cfg.optim.lr == 1e-5


@pytest.mark.parametrize(
    "text, needle",
    [
        ("rollout:\n  n_sample: 4\n", "unknown key rollout.n_sample"),
        ("algo:\n  method: ppo\n", "algo.method: 'ppo' is not allowed; choose one of"),
        ("rollout:\n  n_samples: four\n", "rollout.n_samples: expected an integer"),
        ("rollout:\n  temperature: 0\n", "rollout: temperature must be > 0"),
        ("algo:\n  clip: {dual_clip: 0.5}\n", "algo.clip: dual_clip must be > 1"),
        ("rollout: [1, 2]\n", "rollout: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("rl.steps=ten", "override rl.steps=ten: rl.steps: expected an integer"),
    ("rl.stepz=1", "override rl.stepz=1: unknown key rl.stepz"),
    ("nosuch.key=1", "override nosuch.key=1: unknown key nosuch"),
])
def test_bad_override_is_blamed_on_the_override_not_the_file(tmp_path, override, needle):
    p = tmp_path / "good.yaml"
    p.write_text("name: x\nrl: {steps: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["rl.seed=1", override])
    assert str(e.value).startswith(needle) and str(p) not in str(e.value)
    p.write_text("name: x\nrl: {steps: three}\n")  # the file's own mistake still names the file
    with pytest.raises(ConfigError, match=f"^{p}: rl.steps: expected an integer"):
        load_config(p, ["rl.seed=1"])


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nrollout:\n  n_samples: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ invalid YAML"):
        load_config(p)


def test_cli_help_lists_subcommands(capsys):
    from megatron_scpo.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("train", "eval", "report", "convert", "launch"):
        assert sub in out


def _cfg(tmp_path, text: str, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, list(overrides))


def test_lengths_are_tied_to_max_new_tokens(tmp_path):
    """Issue 11 item 8: Dr.GRPO's normalizer and DAPO's L_max are the generation limit, derived and checked."""
    cfg = _cfg(tmp_path, "rollout: {max_new_tokens: 8000}\nalgo: {loss: {agg: seq-mean-token-sum-norm}}\n")
    assert cfg.algo.loss.norm_length == 8000 and cfg.algo.overlong.max_length == 8000
    assert build(ExperimentConfig, to_dict(cfg)) == cfg
    for text, needle in (
        ("rollout: {max_new_tokens: 8000}\nalgo: {loss: {norm_length: 1024}}\n", "norm_length (1024) must equal"),
        ("rollout: {max_new_tokens: 8000}\nalgo: {method: grpo, overlong: {enabled: true, max_length: 4096}}\n",
         "overlong.max_length (4096) must equal"),
        ("rollout: {max_new_tokens: 400}\nalgo: {method: grpo, overlong: {enabled: true, cache_length: 400}}\n",
         "algo.overlong.cache_length (400) must be < max_length (400"),
    ):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            _cfg(tmp_path, text)


def test_complete_response_under_the_limit_is_not_punished_as_overlong(tmp_path):
    """A complete 5000-token response under an 8000-token limit used to get -1 (window 3584..4096 by default)."""
    import torch

    from megatron_scpo.algo.registry import GroupedRollouts, build_method

    cfg = _cfg(tmp_path, "rollout: {max_new_tokens: 8000}\nalgo: {method: grpo, overlong: {enabled: true}}\n")
    lengths = torch.tensor([5000, 7744, 8000])  # complete; half-way into the 512-token window; at the limit
    step_ids = torch.zeros(3, 1, dtype=torch.long)
    r = GroupedRollouts(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), lengths, step_ids,
                        step_ids >= 0, torch.zeros(3, dtype=torch.bool), ["q"] * 3)
    out = build_method(cfg.algo).compute(r)
    # DAPO: 0 up to L_max - L_cache = 7488, then linear to -1 at L_max
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 1.0 - 256 / 512, 0.0]))


def test_algo_invariant_guards(tmp_path):
    """Settings under which "every correct response >= every wrong one" could fail are refused; dual-clip defaults on."""
    assert _cfg(tmp_path, "name: x\n").algo.clip.dual_clip == 3.0  # verl's clip_ratio_c
    assert _cfg(tmp_path, "algo: {clip: {dual_clip: null}}\n").algo.clip.dual_clip is None
    for text, needle in (
        ("algo: {scpo: {len_gap_frac: 1.0}}\n", r"len_gap_frac must be in \[0.0, 1.0\)"),
        ("algo: {scpo: {advantage: s_gae}}\n", "needs reduce: mean"),
        ("algo: {method: grpo, overlong: {enabled: true, penalty_factor: 1.5}}\n", "penalty_factor"),
        ("algo: {method: global_length_penalty, length_penalty: {alpha: 0.5}, overlong: {enabled: true}}\n",
         r"penalty_factor \(1.0\) must be <= 0.5"),
        ("algo: {length_penalty: {style: kimi, kimi_weight: 3}}\n", "kimi_weight must be in"),
        # keys that would do nothing (the house rule): the window without the punishment, a minmax temperature
        ("algo: {method: grpo, overlong: {cache_length: 64}}\n", "cache_length does nothing without enabled: true"),
        ("algo: {method: grpo, overlong: {penalty_factor: 0.5}}\n", "penalty_factor does nothing without enabled"),
        ("algo: {importance: {temperature: 0.5}}\n", "temperature does nothing with normalize: minmax"),
        ("algo: {importance: {normalize: softmax, temperature: 0}}\n", r"temperature must be in \(0.0, inf\)"),
    ):
        with pytest.raises(ConfigError, match=needle):
            _cfg(tmp_path, text)


def test_calibration_config_runs_the_papers_path():
    """Issue 11 item 7: the 1.5B calibration config is the paper's sync path (population variances, combined)."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "r1_distill_1p5b_calibration.yaml")
    assert (cfg.algo.calibration.variance, cfg.algo.calibration.normalize) == ("population", "combined")
