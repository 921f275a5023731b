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
