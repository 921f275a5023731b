"""Bad input gives one clear error before any training starts (and before Megatron is imported)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_scpo.config import load_config
from megatron_scpo.trainer.run import main

BASE = "name: bad\nrl: {steps: 1}\neval: {enabled: false}\nlogging: {tensorboard: false}\n"


def _run(tmp_path: Path, text: str, capsys, extra: list[str] = ()) -> str:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    had_megatron = "megatron.core.parallel_state" in sys.modules
    rc = main([str(cfg), "--run-dir", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("error:") == 1, err
    assert had_megatron or "megatron.core.parallel_state" not in sys.modules  # failed before Megatron
    assert not (tmp_path / "run").exists()  # nothing was started
    return err


def _file_cfg(tmp_path: Path, lines: list[str]) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return BASE + f"data: {{source: file, train_path: {data}}}\nmodel: {{hf_path: {model}}}\n"


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    text = _file_cfg(tmp_path, ['{"problem": "1+1", "answer": "2"}', '{"problem": "2+2", "answer": 4', ""])
    err = _run(tmp_path, text, capsys)
    assert "train.jsonl:2:" in err


def test_missing_answer_field_names_file_and_line(tmp_path, capsys):
    text = _file_cfg(tmp_path, ['{"problem": "1+1", "answer": "2"}', '{"problem": "2+2"}'])
    err = _run(tmp_path, text, capsys)
    assert "train.jsonl:2:" in err and "answer" in err


def test_unknown_method(tmp_path, capsys):
    err = _run(tmp_path, BASE + "algo: {method: ppo}\n", capsys)
    assert "algo.method: 'ppo' is not allowed" in err
    err = _run(tmp_path, BASE + "compare: {methods: [scpo, dpo]}\n", capsys)
    assert "compare.methods[1]: 'dpo' is not allowed" in err


def test_config_typo_and_bad_override(tmp_path, capsys):
    err = _run(tmp_path, BASE.replace("steps: 1", "stepz: 1"), capsys)
    assert "unknown key rl.stepz" in err and "cfg.yaml" in err
    err = _run(tmp_path, BASE, capsys, extra=["warmstart.lr=fast"])
    assert "warmstart.lr: expected a number" in err


def test_overlong_prompt(tmp_path, capsys):
    err = _run(tmp_path, BASE + "data: {source: synthetic, template: raw_think, max_prompt_tokens: 20}\n", capsys)
    assert "data.max_prompt_tokens=20" in err and "prompt 'arith-train-0'" in err  # BOS counted in the ids


def test_unsupported_combinations(tmp_path, capsys):
    err = _run(tmp_path, BASE + "algo: {loss: {kl_coef: -0.001}}\n", capsys)
    assert "kl_coef must be a finite number >= 0" in err
    for key in ("kl_coef", "tis_cap"):  # NaN passes a plain `< 0` test: the loader must still refuse it
        err = _run(tmp_path, BASE + f"algo: {{loss: {{{key}: .nan}}}}\n", capsys)
        assert f"{key} must be a finite number" in err and "nan" in err
    err = _run(tmp_path, BASE + "eval: {enabled: true, n_samples: 2, pass_k: [1, 4]}\n", capsys)
    assert "pass_k values [4]" in err


def test_every_config_in_configs_dir_loads():
    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny_cpu.yaml", "compare_cpu.yaml", "qwen3_4b_scpo.yaml",
                                       "r1_distill_1p5b_scpo.yaml", "r1_distill_1p5b_lapo.yaml",
                                       "r1_distill_1p5b_calibration.yaml"}
    for p in paths:
        cfg = load_config(p)
        assert cfg.name == p.stem
    tiny = load_config(root / "tiny_cpu.yaml")
    assert tiny.warmstart.enabled and tiny.stage1.enabled and tiny.rl.enabled
    assert tiny.compare.methods == ["scpo", "global_length_penalty"] and tiny.rollout.engine == "local"
    calib = load_config(root / "r1_distill_1p5b_calibration.yaml")  # papers.md 3.4
    assert (calib.rollout.n_samples, calib.rl.prompts_per_step, calib.rl.mini_batches, calib.optim.lr,
            calib.rollout.temperature, calib.rollout.max_new_tokens, calib.rl.steps) == (8, 64, 4, 1e-6, 0.6, 8000, 150)
    lapo = load_config(root / "r1_distill_1p5b_lapo.yaml")  # papers.md 2.5
    assert (lapo.algo.lapo.alpha, lapo.algo.lapo.beta, lapo.algo.lapo.sigma, lapo.rl.prompts_per_step,
            lapo.rollout.temperature) == (0.7, 0.8, 120.0, 128, 1.0)
    assert lapo.compare.methods == ["lapo_stage1", "lapo_stage2"] and lapo.compare.mode == "sequential"
    assert lapo.algo.loss.kl_coef == 1e-4  # papers.md 2.5: k3 KL to the reference


@pytest.mark.parametrize("name", ["tiny_cpu", "compare_cpu"])
def test_cpu_configs_pass_preflight(name):
    from megatron_scpo.trainer.run import preflight

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    data = preflight(cfg)
    assert len(data["train"]) == cfg.data.synthetic.n_train and len(data["eval"]) >= cfg.eval.n_prompts


def test_overrides_before_and_after_options(tmp_path, capsys):
    from megatron_scpo.cli import main as cli_main
    from megatron_scpo.trainer.run import resolve_args

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(BASE)
    run = str(tmp_path / "run")
    c, run_dir = resolve_args([str(cfg), "rl.steps=3", "--run-dir", run, "rl.seed=5", "compare.methods=[scpo,grpo]"])
    assert (c.rl.steps, c.rl.seed, c.compare.methods, run_dir) == (3, 5, ["scpo", "grpo"], tmp_path / "run")
    c, run_dir = resolve_args(["--run-dir", run, str(cfg), "rl.steps=4"])
    assert (c.rl.steps, run_dir) == (4, tmp_path / "run")
    c, run_dir = resolve_args([str(cfg), "rl.steps=2"])
    assert (c.rl.steps, run_dir) == (2, Path("runs") / "bad")
    # through `scpo train`: a bad override after the options is still parsed as an override (one clear error)
    assert cli_main(["train", str(cfg), "rl.steps=3", "--run-dir", run, "warmstart.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "warmstart.lr: expected a number" in err
    assert not (tmp_path / "run").exists()


def test_mini_batches_fewer_samples_than_dp_ranks(tmp_path, capsys, monkeypatch):
    """rl.mini_batches x DP > samples per step fails in preflight (DP = world / (tp*pp)), once, before Megatron."""
    from megatron_scpo.config import ConfigError
    from megatron_scpo.trainer.run import check_rl_batch

    small = ["rollout.n_samples=2", "rl.prompts_per_step=2", "rl.mini_batches=2"]  # 4 samples per step
    for tp, pp, world, ok in ((1, 1, 1, True), (1, 1, 2, True), (1, 1, 4, False), (2, 1, 4, True), (1, 2, 8, False)):
        c = load_config(None, [*small, f"parallel.tp={tp}", f"parallel.pp={pp}"])
        if ok:
            check_rl_batch(c, world)
        else:
            with pytest.raises(ConfigError, match=f"rl.mini_batches=2 .* fewer samples than the {world // (tp * pp)} "):
                check_rl_batch(c, world)
    monkeypatch.setenv("WORLD_SIZE", "4")  # `scpo train` under a 4-process launcher: DP 4
    err = _run(tmp_path, BASE, capsys, extra=small)
    assert "rl.mini_batches=2" in err and "4 data-parallel ranks" in err
