"""`scpo train CONFIG [--run-dir DIR] [key=value ...]`: warm start -> stage 1 -> stage 2 (-> comparison).

Phases run in order, each skippable by config: ``warmstart`` (SFT on verbose traces), ``stage1``
(rejection-sampling SFT), ``rl`` once per method (``compare.methods``, else ``algo.method``; every
method starts from the same snapshot ``rl_start``), then the report. Everything that can be wrong
with the inputs (config, data files, method names, tokenizer/prompt lengths) is checked before Megatron
is imported. Restarting with the same run dir resumes from the newest complete checkpoint: model,
optimizer, RNG, data position, method state (LAPO length map), step counters and the metrics file.
SIGTERM or ``$SCPO_STOP_FILE`` (preempt.py): the current step finishes (RL or SFT step, or stage 1's sampling),
a checkpoint of exactly that position is written, and the process exits with 143. SFT phases also checkpoint
every ``warmstart.checkpoint_interval`` / ``stage1.checkpoint_interval`` steps; their position (data order,
LR schedule step, stage 1's selected pairs) lives in ``trainer_state.json`` under ``data``.
Works single-process and under torchrun (rank 0 owns the rollout engine, see runtime.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from megatron_scpo import configlib
from megatron_scpo.backend.parallel import barrier, broadcast_object, dist_info
from megatron_scpo.config import ConfigError, ExperimentConfig, load_config
from megatron_scpo.trainer.evaluate import evaluate, load_eval
from megatron_scpo.trainer.preempt import PREEMPTED_EXIT_CODE, Preempted, StopRequest
from megatron_scpo.trainer.runtime import Runtime

if TYPE_CHECKING:
    from megatron_scpo.algo.registry import Method


# ------------------------------------------------------------------------------------------- preflight
def methods_of(cfg: ExperimentConfig) -> list[str]:
    return list(cfg.compare.methods) or [cfg.algo.method]


def method_for(cfg: ExperimentConfig, name: str) -> Method:
    """The Method the trainer runs for ``name`` (the run's ``algo`` section with ``method: name``; validated).

    S-GAE's discounted scan is the kernel op ``scpo_kernels.gae.step_discounted_sum`` (bitwise equal to the
    algo spec's loop for the step counts responses have); preflight, the RL phase and the benchmarks build
    methods here only, so what they validate and time is what trains.
    """
    from scpo_kernels.gae import step_discounted_sum

    from megatron_scpo.algo.registry import build_method

    return build_method(dataclasses.replace(cfg.algo, method=name), scan=step_discounted_sum)


def preflight(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything cheap that can fail: data files, methods, tokenizer. Raises ValueError subclasses."""
    from megatron_scpo.data.datasets import load_split

    train = load_split(cfg.data, "train")
    evals = load_split(cfg.data, "eval") if cfg.eval.enabled else []
    if cfg.eval.enabled and not evals:
        raise ConfigError("eval.enabled but the eval split is empty (data.eval_path / data.synthetic.n_eval)")
    if not train and (cfg.rl.enabled or cfg.warmstart.enabled or cfg.stage1.enabled):
        raise ConfigError("the train split is empty")
    for m in methods_of(cfg):
        method_for(cfg, m)
    if (cfg.warmstart.enabled) and cfg.data.source != "synthetic":
        raise ConfigError("warmstart.enabled needs data.source: synthetic (it trains on the task's verbose traces)")
    if cfg.model.hf_path is None and cfg.data.source != "synthetic":
        raise ConfigError("model.hf_path is required unless data.source is synthetic (tiny model built locally)")
    if cfg.model.hf_path is not None and not (Path(cfg.model.hf_path) / "config.json").is_file():
        raise ConfigError(f"model.hf_path: {cfg.model.hf_path}/config.json not found")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.sglang_urls and cfg.model.hf_path is None:
        raise ConfigError("rollout.engine: sglang needs model.hf_path (servers load it) or rollout.sglang_urls")
    if cfg.rl.enabled:
        check_rl_batch(cfg, dist_info()[1])
    check_prompt_lengths(cfg, train + evals)
    return {"train": train, "eval": evals}


def check_rl_batch(cfg: ExperimentConfig, world_size: int) -> None:
    """Each of ``rl.mini_batches`` must give every data-parallel rank a sample: checked once, before Megatron.

    DP is what the world leaves after TP x PP (``backend.parallel.check_layout``, which also rejects a layout
    that does not fit the world). Raises ConfigError naming the keys.
    """
    from megatron_scpo.backend.parallel import check_layout

    par, rl = cfg.parallel, cfg.rl
    dp = check_layout(world_size, par.tp, par.pp, vpp=par.vpp)
    if rl.prompts_per_step * cfg.rollout.n_samples < rl.mini_batches * dp:
        raise ConfigError(f"rl.mini_batches={rl.mini_batches} mini-batches of {rl.prompts_per_step} x "
                          f"{cfg.rollout.n_samples} samples leave fewer samples than the {dp} data-parallel ranks: "
                          "raise rl.prompts_per_step or lower rl.mini_batches")


def check_prompt_lengths(cfg: ExperimentConfig, records: list[Any]) -> None:
    """Every prompt must fit data.max_prompt_tokens (special tokens included): fail in seconds, not mid-run."""
    from megatron_scpo.data.datasets import encode_prompts
    from megatron_scpo.data.tokenizer import build_tokenizer, load_tokenizer

    if cfg.model.hf_path is None:
        tok = build_tokenizer()
    else:
        try:
            tok = load_tokenizer(cfg.model.hf_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.hf_path: cannot load a tokenizer from {cfg.model.hf_path}: {e}") from None
    try:  # the ids rollouts will use (templates.encode_prompt): special tokens such as BOS are counted
        encode_prompts(records, tok, cfg.data.template, cfg.data.max_prompt_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ------------------------------------------------------------------------------------------- runtime
def _model_source(cfg: ExperimentConfig, run_dir: Path) -> tuple[Path, Any, Any]:
    """(HF dir, HF config, tokenizer-or-None). The tiny model's config is known before its dir exists."""
    from megatron_scpo.convert.hf_io import load_hf_config

    if cfg.model.hf_path is not None:
        return Path(cfg.model.hf_path), load_hf_config(cfg.model.hf_path), None
    from megatron_scpo.data.tiny_model import tiny_llama_config
    from megatron_scpo.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    hf_config = tiny_llama_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **cfg.tiny_model.overrides())
    return run_dir / "init_model", hf_config, tok


def _write_tiny_model(cfg: ExperimentConfig, out: Path, tok: Any) -> None:
    """Rank 0 writes the randomly initialised tiny model once (temp dir + rename)."""
    from megatron_scpo.atomic import replace_dir
    from megatron_scpo.data.tiny_model import init_tiny_model

    if (out / "config.json").is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    init_tiny_model(tmp, seed=cfg.tiny_model.seed, tokenizer=tok, **cfg.tiny_model.overrides())
    replace_dir(tmp, out)


def build_runtime(cfg: ExperimentConfig, run_dir: Path) -> Runtime:
    """Megatron policy (parallel state inside, HF weights loaded), tokenizer, rank-0 engine, logger, checkpoints."""
    import torch

    from megatron_scpo.backend.policy import MegatronPolicy
    from megatron_scpo.convert.hf_io import read_hf_checkpoint
    from megatron_scpo.data.tokenizer import load_tokenizer
    from megatron_scpo.rollout import build_engine
    from megatron_scpo.trainer.checkpoint import CheckpointManager
    from megatron_scpo.trainer.metrics import MetricsLogger

    torch.manual_seed(cfg.rl.seed)
    hf_dir, hf_config, tok = _model_source(cfg, run_dir)
    policy = MegatronPolicy(hf_config, cfg.parallel, cfg.optim, dtype=cfg.model.dtype,
                            micro_batch_size=cfg.rl.micro_batch_size, seed=cfg.rl.seed)
    rank, world = dist_info()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model.hf_path is None:
            _write_tiny_model(cfg, hf_dir, tok)
    barrier()
    _, _, hf_tensors = read_hf_checkpoint(hf_dir)
    policy.load_hf_weights(hf_tensors)  # also refreshes the optimizer's main params
    del hf_tensors
    tokenizer = load_tokenizer(hf_dir)
    engine = build_engine(cfg.rollout, hf_dir, tokenizer) if rank == 0 else None
    logger = MetricsLogger(run_dir, cfg.logging, rank=rank, config_dict=configlib.to_dict(cfg))
    ckpt = CheckpointManager(run_dir, keep=cfg.checkpoint.keep, rank=rank, barrier=barrier)
    return Runtime(cfg, run_dir, rank, world, tokenizer, hf_config, hf_dir, policy, engine, logger, ckpt)


# ------------------------------------------------------------------------------------------- phases
def phases_of(cfg: ExperimentConfig) -> list[str]:
    out = []
    if cfg.warmstart.enabled:
        out.append("warmstart")
    if cfg.stage1.enabled:
        out.append("stage1")
    if cfg.rl.enabled:
        out += [f"rl/{m}" for m in methods_of(cfg)]
    return out


def label_of(phase: str) -> str:
    """Snapshot / eval label of a phase: ``rl/scpo`` -> ``rl_scpo``."""
    return phase.replace("/", "_")


@dataclass
class TrainerState:
    """Where a run stands: ``trainer_state.json`` of every checkpoint (``CheckpointManager`` adds ``global_step``).

    Plain JSON values only; a resume loads it back (``from_json``) and continues from exactly this position.
    """

    done: list[str] = field(default_factory=list)  # finished phases, in order (``phases_of``)
    phase: str | None = None  # the phase in progress (None between phases)
    rl_step: int = 0  # RL steps done in the phase in progress
    # data position of the phase in progress: the RL PromptIterator's state_dict, or an SFT phase's
    # {"sft": SFTCursor state, "pairs": stage 1's selected pairs}
    data: dict[str, Any] | None = None
    method_state: dict[str, Any] | None = None  # the RL method's state_dict at ``rl_step`` (LAPO length map)
    metrics_records: int = 0  # metrics.jsonl records at the checkpoint (a resume truncates the file to them)
    weight_version: int = 0  # the engine's weight version at the checkpoint (a resume re-publishes it)
    carry_method_state: dict[str, Any] | None = None  # compare.mode sequential: the last RL method's state

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str | Path) -> TrainerState:
        """``d`` (a checkpoint's trainer state without ``global_step``) -> TrainerState; an unknown key is a
        ConfigError naming ``where`` (the file) rather than a field silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown trainer state keys {unknown} (written by another version?)")
        return cls(**d)


class RunDriver:
    """Runs the phases of ``scpo train`` with checkpoints; ``state`` (TrainerState) is what each one records."""

    def __init__(self, rt: Runtime, data: dict[str, Any], stop: StopRequest | None = None):
        self.rt = rt
        self.cfg = rt.cfg
        self.data = data
        self.stop = stop or StopRequest(rt.rank)
        self.state = TrainerState()
        self.baseline: dict[str, Any] | None = None

    # ---- checkpoint helpers ------------------------------------------------------------------
    def _save(self, snapshot: str | None = None) -> None:
        rt = self.rt
        self.state.metrics_records = broadcast_object(rt.logger.num_records() if rt.is_main else 0)
        self.state.weight_version = rt.weight_version
        from megatron_scpo.trainer.checkpoint import hf_saver

        rt.ckpt.save(rt.global_step, self.state.to_json(), rt.policy.save_shards, snapshot=snapshot,
                     save_hf=hf_saver(rt.policy, rt.hf_dir, rt.rank, self.cfg.checkpoint.save_hf))

    def resume(self) -> bool:
        rt = self.rt
        latest = rt.ckpt.latest()
        if latest is None:
            return False
        st = rt.ckpt.load(latest, load_model=rt.policy.load_shards)
        rt.global_step = int(st.pop("global_step"))
        from megatron_scpo.trainer.checkpoint import STATE_FILE

        self.state = TrainerState.from_json(st, latest / STATE_FILE)
        rt.logger.truncate(self.state.metrics_records)
        rt.sync_weights(version=self.state.weight_version)
        if rt.is_main:
            print(f"[resume] {latest.name}: done={self.state.done} phase={self.state.phase} "
                  f"rl_step={self.state.rl_step} global_step={rt.global_step}", flush=True)
        return True

    def _reference(self, at_rl_start: bool) -> Any:
        """The frozen KL reference = the rl_start weights (reference.py explains the host-copy swap)."""
        from megatron_scpo.trainer.reference import ReferencePolicy

        if at_rl_start:
            return ReferencePolicy.from_live(self.rt.policy)
        snap = self.rt.ckpt.snapshot("rl_start")
        if snap is None:
            raise ConfigError(f"{self.rt.ckpt.root}: algo.loss.kl_coef > 0 needs the rl_start snapshot as the "
                              "reference policy, and this run has none (it started without KL); use a new run dir")
        return ReferencePolicy.from_checkpoint(self.rt.policy, snap / "model")

    # ---- phases --------------------------------------------------------------------------------
    def run(self) -> None:
        self.baseline = load_eval(self.rt.run_dir, "warmstart")
        if not self.state.done and self.state.phase is None and self.cfg.eval.enabled:
            if not self.cfg.warmstart.enabled:  # the starting model is the baseline
                self._eval("warmstart")
        if self.state.done and self.state.phase is None:
            # killed during the evaluation that follows a stage snapshot: the loaded weights are that
            # snapshot's, so its evaluation can be redone now (no-op when it exists)
            self._eval(label_of(self.state.done[-1]))
        for phase in phases_of(self.cfg):
            if phase in self.state.done:
                continue
            self._check_stop("before " + phase)  # the newest checkpoint already holds this position
            self.state.phase = phase
            if phase == "warmstart":
                self.warmstart()
            elif phase == "stage1":
                self.stage1()
            else:
                self.rl(phase.split("/", 1)[1])
        if self.rt.is_main and self.cfg.eval.enabled:
            from megatron_scpo.trainer.report import write_report

            print(write_report([self.rt.run_dir], self.rt.run_dir), flush=True)
        barrier()

    def _eval(self, label: str) -> None:
        if not self.cfg.eval.enabled:
            return
        if self.rt.is_main and load_eval(self.rt.run_dir, label) is None:
            res = evaluate(self.rt, self.data["eval"], label, self.baseline if label != "warmstart" else None)
            if label == "warmstart":
                self.baseline = res
        barrier()

    def _check_stop(self, where: str) -> None:
        """Collective stop decision; raise Preempted (the caller has checkpointed the current position)."""
        if self.stop.poll():
            if self.rt.is_main:
                print(f"[stop] stopping {where} (global_step={self.rt.global_step}); restart with the same run dir "
                      f"to resume", flush=True)
            raise Preempted(where)

    def _finish(self, phase: str) -> None:
        st = self.state
        st.done, st.phase, st.rl_step, st.data, st.method_state = [*st.done, phase], None, 0, None, None
        self._save(snapshot=label_of(phase))
        self._check_stop(f"after {phase}")  # a resume redoes the skipped evaluation (see run())
        self._eval(label_of(phase))

    def _sft_position(self, phase: str) -> dict[str, Any] | None:
        """The saved mid-phase state of ``phase`` when this run resumed inside it (``state.data``)."""
        data = self.state.data
        return data if self.state.phase == phase and isinstance(data, dict) else None

    def _sft_saver(self, extra: dict[str, Any] | None = None) -> Any:
        """``save(cursor_state)`` for sft_train: a step checkpoint of the SFT position (+ stage 1's pairs)."""
        def save(cursor: dict[str, Any] | None) -> None:
            self.state.data = {**(extra or {}), "sft": cursor}
            self._save()
        return save

    def warmstart(self) -> None:
        from megatron_scpo.trainer.sft import sft_train, trace_pairs

        c = self.cfg.warmstart
        pairs = trace_pairs(self.rt, self.data["train"], c.trace)
        pos = self._sft_position("warmstart")
        sft_train(self.rt, pairs, steps=c.steps, batch_size=c.batch_size, micro_batch_size=c.micro_batch_size,
                  lr=c.lr, warmup_steps=c.warmup_steps, seed=self.cfg.rl.seed, stage="warmstart",
                  log_every=c.log_every, stop=self.stop, checkpoint_interval=c.checkpoint_interval,
                  save=self._sft_saver(), position=pos and pos.get("sft"))
        self.rt.sync_weights()
        self._finish("warmstart")

    def stage1(self) -> None:
        from megatron_scpo.data.datasets import PromptIterator
        from megatron_scpo.trainer.sft import rejection_sample, sft_train

        c = self.cfg.stage1
        pos = self._sft_position("stage1")
        if pos is not None and "pairs" in pos:  # resumed after sampling: the checkpoint holds the selection
            pairs = [(list(p), list(r)) for p, r in pos["pairs"]]
        else:
            records = PromptIterator(self.data["train"], seed=self.cfg.data.shuffle_seed + 1).next_batch(
                min(c.n_prompts, len(self.data["train"])))
            pairs, stats = rejection_sample(self.rt, records)
            self.rt.logger.log("stage1/sample", 0, stats)
            pos = None
        save = self._sft_saver({"pairs": [[p, r] for p, r in pairs]})
        if pairs:
            if pos is None and (c.checkpoint_interval or self.stop.poll()):  # sampling is the costly part
                save(None)
                self._check_stop("stage1 after sampling")
            steps = max(1, math.ceil(len(pairs) * c.epochs / c.batch_size))
            sft_train(self.rt, pairs, steps=steps, batch_size=min(c.batch_size, len(pairs)),
                      micro_batch_size=c.micro_batch_size, lr=c.lr, warmup_steps=0, seed=self.cfg.rl.seed,
                      stage="stage1", log_every=max(1, steps // 5), stop=self.stop,
                      checkpoint_interval=c.checkpoint_interval, save=save, position=pos and pos.get("sft"))
            self.rt.sync_weights()
        elif self.rt.is_main:
            print("[stage1] no verified-correct samples: stage 1 SFT skipped", flush=True)
        self._finish("stage1")

    def rl(self, name: str) -> None:
        from megatron_scpo.data.datasets import PromptIterator
        from megatron_scpo.trainer.rl import rl_step
        from megatron_scpo.trainer.sft import set_lr

        rt, c = self.rt, self.cfg.rl
        method = method_for(self.cfg, name)
        it = PromptIterator(self.data["train"], seed=self.cfg.data.shuffle_seed)
        start = self.state.rl_step
        sequential = self.cfg.compare.mode == "sequential"
        use_kl = self.cfg.algo.loss.kl_coef > 0
        at_rl_start = False  # are the live weights exactly the rl_start snapshot's?
        if start > 0:  # resumed inside this phase: model/optimizer/RNG already restored
            it.load_state_dict(self.state.data)
            method.load_state_dict(self.state.method_state or {})
        else:
            snap = rt.ckpt.snapshot("rl_start")
            if snap is None and (not sequential or use_kl):  # with KL, rl_start is also the reference policy
                self._save(snapshot="rl_start")
                at_rl_start = True
            elif snap is not None and not sequential:  # every method starts from the same weights and optimizer
                rt.ckpt.load(snap, load_model=rt.policy.load_shards)  # and its RNG: every method starts alike
                rt.sync_weights()
                at_rl_start = True
            if sequential and self.state.carry_method_state:  # continue from the previous method's
                method.load_state_dict(self.state.carry_method_state)  # weights and state (LAPO map)
        rt.reference = self._reference(at_rl_start) if use_kl else None
        set_lr(rt.policy, self.cfg.optim.lr)
        stage = f"rl/{name}"
        for step in range(start, c.steps):
            records = it.next_batch(c.prompts_per_step)
            metrics = rl_step(rt, method, records, step, seed=c.seed * 100003 + step, draw=it.next_batch)
            rt.global_step += 1
            rt.logger.log(stage, step + 1, metrics)
            if step + 1 == c.steps:
                break  # the phase snapshot in _finish is this position's checkpoint (and checks the stop)
            stop = self.stop.poll()
            if stop or (self.cfg.checkpoint.interval and (step + 1) % self.cfg.checkpoint.interval == 0):
                self.state.rl_step, self.state.data, self.state.method_state = (step + 1, it.state_dict(),
                                                                                method.state_dict())
                self._save()
            if stop:
                self._check_stop(f"{stage} after step {step + 1}")
        self.state.carry_method_state = method.state_dict() if sequential else None
        self._finish(stage)


# ------------------------------------------------------------------------------------------- entry points
def train(cfg: ExperimentConfig, run_dir: str | Path, data: dict[str, Any] | None = None) -> Path:
    """Run (or resume) the whole pipeline of ``cfg`` in ``run_dir``; returns the run dir."""
    run_dir = Path(run_dir)
    data = data if data is not None else preflight(cfg)
    stop = StopRequest(dist_info()[0])
    stop.install()  # from here on SIGTERM only sets a flag; steps finish, then we checkpoint and exit
    try:
        rt = build_runtime(cfg, run_dir)
        if rt.is_main:  # the resolved config of the run (`scpo eval --run-dir` builds a runtime too: not here)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
        try:
            driver = RunDriver(rt, data, stop)
            driver.resume()
            driver.run()
        finally:
            rt.logger.close()
            if rt.engine is not None:
                rt.engine.shutdown()
    finally:
        stop.uninstall()
    return run_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (configs/tiny_cpu.yaml is the embedded default)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. rl.steps=10")
    p.add_argument("--run-dir", default=None, help="run directory (default: config run_dir or runs/<name>)")


def quiet_warnings() -> None:
    """Deprecation chatter of megatron/torch on every checkpoint would bury the step lines."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")


def resolve_args(argv: list[str] | None) -> tuple[ExperimentConfig, Path]:
    """``CONFIG [--run-dir DIR] [key=value ...]`` -> (config with overrides, run dir).

    Overrides may come before and after the options (``parse_intermixed_args``), e.g.
    ``scpo train cfg.yaml rl.steps=10 --run-dir runs/x compare.methods=[scpo,grpo]``.
    """
    p = argparse.ArgumentParser(prog="scpo train", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_intermixed_args(argv)
    cfg = load_config(a.config, a.overrides)
    return cfg, Path(a.run_dir or cfg.run_dir or Path("runs") / cfg.name)


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    try:
        cfg, run_dir = resolve_args(argv)
        data = preflight(cfg)  # everything that can fail cheaply, before Megatron is imported
    except ValueError as e:
        print(f"scpo train: error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg, run_dir, data)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    return 0
