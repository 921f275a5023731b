"""`checkpoint.save_hf`: every checkpoint the trainer writes holds an HF copy, and `scpo convert` reads them all.

Real training runs on the tiny model (tests/trainer/trainer_tiny.py):

- world 1, distributed optimizer on (the default): warm-start SFT with a mid-phase checkpoint, stage 1
  (rejection sampling), two RL steps with step checkpoints; every checkpoint (mid-phase, ``warmstart``,
  ``stage1``, ``rl_start``, ``step_*``, ``rl_scpo``) must hold ``hf/`` (safetensors, config, tokenizer,
  generation config), bitwise equal to ``mcore-to-hf`` of the same checkpoint (the converter reading the trainer's
  own dist checkpoint, optimizer state and all: once through ``scpo convert`` on the ``model/`` subdir).
  Then ``scpo eval --hf <ckpt>/hf`` gives the same metrics JSON as ``scpo eval --run-dir`` of that checkpoint.
- world 2, TP=2, distributed optimizer off, bf16: RL checkpoints; the export (gathered over TP, bf16, config.json
  saying so) equals the converter's output loaded at TP=2 and at TP=1 x DP=2 (built in the stored dtype).

Without Megatron (fast): ``hf/`` written inside ``CheckpointManager.save`` (config/tokenizer only without
``save_hf``; bf16 weights and dtype in config.json with it; an export dying mid-stream leaves no checkpoint and
``latest`` unchanged; non-writer ranks drain the stream), and how ``--mcore`` finds the dist checkpoint and config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_utils import spawn
from trainer_tiny import TINY_RL

SAVE_HF = [*TINY_RL, "checkpoint.save_hf=true", "checkpoint.interval=1", "checkpoint.keep=10", "rl.steps=2"]
WORLD1 = [
    *SAVE_HF, "name=savehf1", "warmstart.enabled=true", "warmstart.steps=2", "warmstart.batch_size=4",
    "warmstart.micro_batch_size=4", "warmstart.checkpoint_interval=1", "warmstart.log_every=1",
    "stage1.enabled=true", "stage1.n_prompts=2", "stage1.n_samples=2", "stage1.batch_size=2",
    "stage1.micro_batch_size=2", "stage1.checkpoint_interval=1",
]  # fmt: skip
WORLD2 = [*SAVE_HF, "name=savehf2", "parallel.tp=2", "parallel.use_distributed_optimizer=false", "model.dtype=bfloat16",
          "rl.sync_check=false"]  # bf16 trainer vs fp32 engine exceeds the fp32 post-sync tolerance (1e-3)
EVAL = ["eval.enabled=true", "eval.n_prompts=4", "eval.n_samples=2", "eval.pass_k=[1,2]"]


def _same_safetensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def _check_checkpoints(run_dir: Path, out_root: Path, rank: int, tp_loads: tuple[int, ...]) -> dict:
    """Every complete checkpoint: its hf/ vs mcore_to_hf of it (rank 0 compares; all ranks convert)."""
    from megatron_scpo.convert.checkpoint import mcore_to_hf
    from megatron_scpo.convert.cli import main as convert_main
    from megatron_scpo.trainer.checkpoint import STATE_FILE

    ckpts = sorted(p for p in (run_dir / "checkpoints").iterdir() if (p / STATE_FILE).is_file())
    res: dict = {"names": [p.name for p in ckpts], "leftovers": [], "files": {}, "equal": {}}
    res["leftovers"] = [p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp" in p.name]
    for i, ck in enumerate(ckpts):
        tp = tp_loads[i % len(tp_loads)]
        out = out_root / f"{ck.name}_tp{tp}"
        if i == 0:  # the user's path: the CLI on the model/ subdir, config found in the checkpoint's hf/
            assert convert_main(["mcore-to-hf", "--mcore", str(ck / "model"), "--out", str(out), "--tp", str(tp)]) == 0
        else:
            mcore_to_hf(ck, out, tp=tp)
        if rank == 0:
            res["dtype"] = json.loads((ck / "hf" / "config.json").read_text()).get("dtype")
            res["files"][ck.name] = sorted(p.name for p in (ck / "hf").iterdir())
            res["equal"][out.name] = _same_safetensors(ck / "hf" / "model.safetensors", out / "model.safetensors")
            res["config_equal"] = (ck / "hf" / "config.json").read_text() == (out / "config.json").read_text()
    return res


def _world1(rank: int, world: int, out_json: str, root: str) -> None:
    from megatron_scpo.config import load_config
    from megatron_scpo.trainer import eval_cli
    from megatron_scpo.trainer.eval_cli import evaluate_checkpoint
    from megatron_scpo.trainer.run import quiet_warnings, train

    quiet_warnings()
    root_p = Path(root)
    run_dir = root_p / "run"
    train(load_config(None, WORLD1), run_dir)
    res = _check_checkpoints(run_dir, root_p / "converted", rank, (1,))
    # the same checkpoint evaluated through Megatron (load + weight sync) and as a plain HF dir
    cfg = load_config(None, [*WORLD1, *EVAL])
    trained_cfg = (run_dir / "config.yaml").read_text()
    evaluate_checkpoint(cfg, run_dir, "rl_scpo", "megatron", str(root_p / "eval_mcore"))
    assert (run_dir / "config.yaml").read_text() == trained_cfg  # evaluating a run leaves its config as trained
    assert eval_cli.main([str(run_dir / "config.yaml"), *EVAL, "--hf", str(run_dir / "checkpoints/rl_scpo/hf"),
                          "--label", "hf", "--out", str(root_p / "eval_hf")]) == 0
    res["eval"] = {k: json.loads((root_p / d / "eval" / f"{k}.json").read_text())
                   for k, d in (("megatron", "eval_mcore"), ("hf", "eval_hf"))}
    Path(out_json).write_text(json.dumps(res))


def _world2(rank: int, world: int, out_json: str, root: str) -> None:
    from megatron_scpo.config import load_config
    from megatron_scpo.trainer.run import quiet_warnings, train

    quiet_warnings()
    run_dir = Path(root) / "run"
    train(load_config(None, WORLD2), run_dir)
    res = _check_checkpoints(run_dir, Path(root) / "converted", rank, (2, 1))
    if rank == 0:
        Path(out_json).write_text(json.dumps(res))


def _assert_all_exported(res: dict, expect: set[str]) -> None:
    assert expect <= set(res["names"]), res["names"]
    assert not res["leftovers"], res["leftovers"]
    for name, files in res["files"].items():
        for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
            assert f in files, (name, files)
    assert res["equal"] and all(res["equal"].values()), res["equal"]
    assert res["config_equal"]


@pytest.mark.distributed
def test_save_hf_every_checkpoint_and_eval_parity(tmp_path: Path):
    out = tmp_path / "w1.json"
    spawn(_world1, world_size=1, args=(str(out), str(tmp_path / "w1")))
    res = json.loads(out.read_text())
    _assert_all_exported(res, {"warmstart", "stage1", "rl_start", "rl_scpo", "step_000001"})
    assert len([n for n in res["names"] if n.startswith("step_")]) >= 2  # an SFT mid-phase and an RL step
    mc, hf = res["eval"]["megatron"], res["eval"]["hf"]
    # every metric (and the example response) equal; run metadata (label, time, which entry point) may differ
    metrics = {k for k, v in mc.items() if isinstance(v, (int, float, dict)) and k != "created"}
    assert metrics == {k for k, v in hf.items() if isinstance(v, (int, float, dict)) and k != "created"}
    assert {k: mc[k] for k in metrics} == {k: hf[k] for k in metrics}
    assert mc["example"] == hf["example"]
    print("checkpoints:", res["names"], "\neval metrics (both paths):", json.dumps({k: mc[k] for k in sorted(metrics)}))
    assert "pass@1" in mc and mc["mean_tokens"] > 0


@pytest.mark.distributed
def test_save_hf_tp2_without_distributed_optimizer(tmp_path: Path):
    out = tmp_path / "w2.json"
    spawn(_world2, world_size=2, args=(str(out), str(tmp_path / "w2")))
    res = json.loads(out.read_text())
    _assert_all_exported(res, {"rl_start", "step_000001", "rl_scpo"})
    assert res["dtype"] == "bfloat16"
    assert any(k.endswith("_tp2") for k in res["equal"]) and any(k.endswith("_tp1") for k in res["equal"])


# ---- fast checks without Megatron: the hf/ writer inside CheckpointManager.save, and --mcore resolution ----------
class _FakePolicy:
    """named_hf_parameters() like MegatronPolicy's (HF names, full tensors); ``fail_after`` raises mid-stream."""

    def __init__(self, dtype, fail_after: int | None = None):
        import torch

        self.tensors = [("model.embed_tokens.weight", torch.ones(4, 2, dtype=dtype)),
                        ("model.norm.weight", torch.full((2,), 2.0, dtype=dtype))]
        self.fail_after = fail_after

    def named_hf_parameters(self):
        for i, nt in enumerate(self.tensors):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("export died")
            yield nt


def _source_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"not copied")
    return src


def test_hf_dir_in_every_checkpoint_atomic_and_dtype(tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    from megatron_scpo.trainer.checkpoint import CheckpointManager, hf_saver

    src = _source_dir(tmp_path)
    mgr = CheckpointManager(tmp_path / "run", keep=5)

    def save_model(d: Path) -> None:
        d.mkdir(parents=True)

    # save_hf off: hf/ still holds config + tokenizer (so mcore-to-hf needs nothing else), no weights
    p1 = mgr.save(1, {}, save_model, save_hf=hf_saver(_FakePolicy(torch.float32), src, 0, weights=False))
    assert sorted(x.name for x in (p1 / "hf").iterdir()) == ["config.json", "generation_config.json", "tokenizer.json"]
    # save_hf on, a bf16 model: safetensors in the model dtype and config.json saying so
    p2 = mgr.save(2, {}, save_model, save_hf=hf_saver(_FakePolicy(torch.bfloat16), src, 0, weights=True))
    sd = load_file(str(p2 / "hf" / "model.safetensors"))
    assert sorted(sd) == ["model.embed_tokens.weight", "model.norm.weight"] and sd["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((p2 / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((src / "config.json").read_text())["dtype"] == "float32"  # the source is untouched
    # the export dies mid-stream: no step_000003, latest still step_000002
    with pytest.raises(RuntimeError, match="export died"):
        mgr.save(3, {}, save_model, save_hf=hf_saver(_FakePolicy(torch.float32, fail_after=1), src, 0, weights=True))
    assert not (mgr.root / "step_000003").exists() and mgr.latest().name == "step_000002"
    # a non-writer rank drains the collective stream and writes nothing
    from megatron_scpo.trainer.checkpoint import export_hf

    drained = _FakePolicy(torch.float32)
    assert export_hf(tmp_path / "never", src, drained.named_hf_parameters(), is_writer=False) == []
    assert not (tmp_path / "never").exists()


def test_mcore_source_resolution(tmp_path: Path):
    from megatron_scpo.convert.checkpoint import resolve_mcore_source
    from megatron_scpo.convert.mapping import ConversionError

    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_000004"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "metadata.json").write_text("{}")
    (ck / "trainer_state.json").write_text("{}")
    with pytest.raises(ConversionError, match="pass --hf-config"):  # no hf/, no run config
        resolve_mcore_source(ck)
    (run / "config.yaml").write_text(f"model:\n  hf_path: {_source_dir(tmp_path)}\n")
    assert resolve_mcore_source(ck) == (ck / "model", tmp_path / "src")  # older checkpoints: the run's model
    (run / "init_model").mkdir()
    (run / "init_model" / "config.json").write_text("{}")
    assert resolve_mcore_source(ck / "model") == (ck / "model", run / "init_model")  # the tiny model's dir
    (ck / "hf").mkdir()
    (ck / "hf" / "config.json").write_text("{}")
    for given in (ck, ck / "model"):  # the checkpoint's own hf/ wins
        assert resolve_mcore_source(given) == (ck / "model", ck / "hf")
    assert resolve_mcore_source(ck, tmp_path / "other") == (ck / "model", tmp_path / "other")
    with pytest.raises(ConversionError, match="not a directory"):
        resolve_mcore_source(tmp_path / "missing")
