"""Every `scpo` subcommand reports bad input in one line (file, line, field), exit code 2, no traceback.

Through the real entry point (`megatron_scpo.cli.main`, and one subprocess run of `python -m megatron_scpo.cli`);
nothing here loads a model: every error is raised before an engine or Megatron would start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_scpo.cli import main

GOOD = '{"problem": "1 + 1", "answer": "2"}'


def _one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def _eval_cfg(tmp_path: Path, rows: list[str], extra: str = "") -> Path:
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(r + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: bad\ndata: {{source: file, train_path: {data}, eval_path: {data}{extra}}}\n")
    return cfg


def test_eval_malformed_row_is_one_line_through_the_real_cli(tmp_path: Path):
    cfg = _eval_cfg(tmp_path, [GOOD, '{"problem": "2 + 2", "answer": 4'])
    proc = subprocess.run([sys.executable, "-m", "megatron_scpo.cli", "eval", str(cfg), "--hf", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"{tmp_path / 'eval.jsonl'}:2: malformed JSON" in proc.stderr


@pytest.mark.parametrize(("row", "field"), [('{"problem": "2 + 2"}', "answer"), ('{"answer": "4"}', "problem"),
                                            ('{"problem": "", "answer": "4"}', "'problem'")])
def test_eval_bad_field_names_file_line_and_field(tmp_path: Path, capsys, row: str, field: str):
    line = _one_line(capsys, ["eval", str(_eval_cfg(tmp_path, [GOOD, GOOD.replace("1 + 1", "3"), row])), "--hf",
                              str(tmp_path)])
    assert line.startswith("scpo eval: error:") and "eval.jsonl:3:" in line and field in line


def test_eval_hf_dir_and_overlong_prompt(tmp_path: Path, capsys):
    from megatron_scpo.data.tokenizer import build_tokenizer

    cfg = _eval_cfg(tmp_path, [GOOD], extra=", template: synthetic, max_prompt_tokens: 4")
    line = _one_line(capsys, ["eval", str(cfg), "--hf", str(tmp_path / "nomodel")])
    assert "nomodel/config.json not found" in line
    model = tmp_path / "model"
    build_tokenizer(model)  # a tokenizer + a config.json: enough to encode prompts (no weights are loaded)
    (model / "config.json").write_text("{}")
    line = _one_line(capsys, ["eval", str(cfg), "--hf", str(model)])
    assert "prompt '0' has" in line and "data.max_prompt_tokens=4" in line
    assert not (Path("eval") / "model.json").exists()


def test_eval_run_dir_without_the_checkpoint_writes_nothing(tmp_path: Path, capsys):
    """`scpo eval --run-dir` checks the checkpoint before Megatron starts: one line listing what exists, and no
    init_model/ or checkpoints/ left behind in a dir that is not a run."""
    cfg = _eval_cfg(tmp_path, [GOOD])
    empty = tmp_path / "not_a_run"
    line = _one_line(capsys, ["eval", str(cfg), "--run-dir", str(empty)])
    assert "no complete checkpoint" in line and not empty.exists()
    run = tmp_path / "run"
    for name in ("stage1", "step_000010"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "step_000012.tmp").mkdir()  # a crashed save is not offered
    line = _one_line(capsys, ["eval", str(cfg), "--run-dir", str(run), "--checkpoint", "rl_scpoo"])
    assert "'rl_scpoo'" in line and "['stage1', 'step_000010']" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_other_subcommands(tmp_path: Path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("name: x\nrl: {stepz: 1}\n")
    assert "unknown key rl.stepz" in _one_line(capsys, ["eval", str(cfg), "--hf", str(tmp_path)])
    assert "unknown key rl.stepz" in _one_line(capsys, ["train", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert "no eval/ directory" in _one_line(capsys, ["report", str(tmp_path / "nope")])
    assert "no such file or directory" in _one_line(capsys, ["convert", "gguf-to-hf", str(tmp_path / "n"),
                                                             str(tmp_path / "o")])
    data = tmp_path / "g.jsonl"
    data.write_text('{"question": "1+1", "answer": "x #### 2"}\n{"question": "2+2"}\n')
    line = _one_line(capsys, ["data", "convert", "--format", "gsm8k", str(data), str(tmp_path / "o.jsonl")])
    assert "g.jsonl:2:" in line and "answer" in line


def test_eval_hf_uses_the_configured_engine_and_the_one_encoding(tmp_path: Path, monkeypatch, capsys):
    """`scpo eval --hf` builds its engine with rollout.build_engine (honouring rollout.engine, as training does) and
    sends it the ids of templates.encode_prompt: with the task tokenizer, one BOS then the synthetic prompt."""
    from megatron_scpo import rollout
    from megatron_scpo.data import templates
    from megatron_scpo.data.tokenizer import build_tokenizer
    from megatron_scpo.rollout.base import Sample

    model = tmp_path / "model"
    tok = build_tokenizer(model)
    (model / "config.json").write_text("{}")
    cfg = _eval_cfg(tmp_path, [GOOD, '{"problem": "2 + 3", "answer": "5"}'], extra=", template: synthetic")
    cfg.write_text(cfg.read_text() + "rollout: {engine: sglang, sglang_urls: ['http://127.0.0.1:9']}\n"
                   "eval: {n_samples: 1, pass_k: [1]}\n")
    seen: dict = {}

    class Engine:
        def generate(self, prompts, n, params):
            seen["prompts"] = prompts
            return [[Sample(p, [tok.eos_token_id], "\\boxed{2}", [0.0], "stop")] for p in prompts]

        def shutdown(self):
            seen["shutdown"] = True

    def build_engine(c, hf_dir, tokenizer):
        seen["engine"], seen["dir"] = c.engine, Path(hf_dir)
        return Engine()

    monkeypatch.setattr(rollout, "build_engine", build_engine)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(cfg), "--hf", str(model), "--label", "x"]) == 0, capsys.readouterr().err
    assert seen["engine"] == "sglang" and seen["dir"] == model and seen["shutdown"]
    want = [templates.encode_prompt(p, "synthetic", tok) for p in ("1 + 1", "2 + 3")]
    assert seen["prompts"] == want and all(p[0] == tok.bos_token_id != p[1] for p in want)
    assert (tmp_path / "eval" / "x.json").is_file()
