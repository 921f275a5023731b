"""run.py's pieces that need no model: the TrainerState record and the trainer's import graph."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from megatron_scpo.config import ConfigError
from megatron_scpo.trainer.run import TrainerState

TRAINER = Path(__file__).resolve().parents[2] / "megatron_scpo" / "trainer"


def test_trainer_state_json_round_trip_and_keys():
    """The JSON a checkpoint holds: the eight keys the run driver has always written, and back equal."""
    st = TrainerState(done=["warmstart", "stage1"], phase="rl/scpo", rl_step=3, data={"order": [2, 0, 1], "epoch": 1},
                      method_state={"map": {"p0": 12.5}}, metrics_records=17, weight_version=5)
    d = json.loads(json.dumps(st.to_json()))
    assert d == {"done": ["warmstart", "stage1"], "phase": "rl/scpo", "rl_step": 3,
                 "data": {"order": [2, 0, 1], "epoch": 1}, "method_state": {"map": {"p0": 12.5}},
                 "metrics_records": 17, "weight_version": 5, "carry_method_state": None}
    assert TrainerState.from_json(d, "x.json") == st
    assert TrainerState.from_json({}, "x.json") == TrainerState()  # every key has the fresh-run default
    assert st.to_json()["done"] is not st.done  # a snapshot: later phases do not rewrite a saved state


def test_trainer_state_unknown_key_names_the_file():
    with pytest.raises(ConfigError, match=r"ckpt/trainer_state\.json: unknown trainer state keys \['rl_stepz'\]"):
        TrainerState.from_json({"rl_stepz": 1}, "ckpt/trainer_state.json")


def _imports(module: str) -> set[str]:
    """Project modules ``trainer/<module>.py`` imports, at the top or inside functions."""
    tree = ast.parse((TRAINER / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_scpo"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("megatron_scpo"))
    return out


def test_trainer_modules_import_no_cycle():
    """No import cycle among the trainer modules, lazy imports included (evaluate <-> run was one; sft imported
    the stage-2 module rl.py for its rollout helpers)."""
    mods = {p.stem for p in TRAINER.glob("*.py") if p.stem != "__init__"}
    graph = {m: {i.rsplit(".", 1)[1] for i in _imports(m) if i.startswith("megatron_scpo.trainer.")} & mods
             for m in mods}
    assert "rl" not in graph["sft"] and "run" not in graph["evaluate"]

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
        for n in sorted(graph[m]):
            visit(n, (*path, m))

    for m in sorted(mods):
        visit(m, ())
