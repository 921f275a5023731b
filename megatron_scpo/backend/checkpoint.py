"""The backend's part of a checkpoint: model + optimizer shards and a small meta file, in the directory it is given.

The trainer owns the checkpoint protocol (``trainer/checkpoint.py``: temp dir, fsync, rename, trainer state, RNG);
the backend only writes its shards into, and reads them from, the directory the trainer hands it:

- megatron dist-checkpointing files (``metadata.json``, ``.metadata``, ``common.pt``, ``*.distcp``): the model
  chunks (``model`` or ``model0..``, global keys, so any TP/PP/VPP reshards) and the optimizer
  (``optimizer``, nested per chunk, sharded ``fully_reshardable`` or ``dp_reshardable``);
- ``scpo_backend_meta.json`` (``CKPT_META``): ``format_version``, ``layout`` (tp/pp/dp/vpp), ``steps_done``,
  the architecture fields checked on load (``model_type``, ``vocab_size``, ``num_layers``, ``hidden_size``),
  ``optim_sharding`` and ``use_distributed_optimizer``.

No RNG here (``backend/rng.py``, saved by the trainer) and no atomicity (the trainer's temp dir gives it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_scpo.backend.policy import MegatronPolicy

CKPT_META = "scpo_backend_meta.json"
# 2: RNG left the backend dir (was rng_states.pt; now the trainer's rng/ beside it), no ``extra``, no temp dir.
CKPT_FORMAT_VERSION = 2
ARCH_FIELDS = ("model_type", "vocab_size", "num_layers", "hidden_size")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, of another format or incompatible with this model."""


def _model_sharded_state_dict(policy: MegatronPolicy) -> dict[str, Any]:
    mods = policy.modules()
    if len(mods) == 1:
        return {"model": mods[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(mods)}


def _sharded_state_dict(policy: MegatronPolicy, is_loading: bool) -> dict[str, Any]:
    model_sd = _model_sharded_state_dict(policy)
    sd = dict(model_sd)
    metadata = {"distrib_optim_sharding_type": policy.ckpt_optim_sharding}
    # Nested per chunk, as Megatron-LM passes it: the chunks' *local* keys collide under VPP (every chunk
    # has decoder.layers.0...), so a flattened dict would silently drop all but the last chunk's params.
    sd["optimizer"] = policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return sd


def save_shards(policy: MegatronPolicy, directory: str | os.PathLike) -> None:
    """Write ``policy``'s model + optimizer shards and ``CKPT_META`` into ``directory`` (collective).

    ``directory`` is created when missing (rank 0) and should be empty; writing is not atomic: the caller's
    temp dir is (``CheckpointManager.save``). Every rank calls this with the same path.
    """
    from megatron.core import dist_checkpointing

    path = Path(directory)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # A never-stepped DistributedOptimizer has empty Adam state, which megatron (no TE/Apex) cannot
    # shard for saving; zero state with step 0 is exactly what the first step would create.
    _prime_optimizer_state(policy.optimizer)
    dist_checkpointing.save(_sharded_state_dict(policy, is_loading=False), str(path))
    if dist.get_rank() == 0:
        meta = {
            "format_version": CKPT_FORMAT_VERSION,
            "layout": policy.info.layout,
            "steps_done": policy.steps_done,
            **{k: getattr(policy.arch, k) for k in ARCH_FIELDS},
            "optim_sharding": policy.ckpt_optim_sharding,
            "use_distributed_optimizer": policy.parallel.use_distributed_optimizer,
        }
        (path / CKPT_META).write_text(json.dumps(meta, indent=1))
    dist.barrier()


def read_meta(policy: MegatronPolicy, directory: str | os.PathLike) -> dict[str, Any]:
    """``CKPT_META`` of ``directory``, checked: present, this format version, ``policy``'s architecture.

    Raises CheckpointError naming the file and the field.
    """
    path = Path(directory)
    meta_file = path / CKPT_META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a complete backend checkpoint (missing {CKPT_META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != CKPT_FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format_version {meta.get('format_version')} != {CKPT_FORMAT_VERSION} "
                              "(a checkpoint of another megatron_scpo version; start a new run dir)")
    for k in ARCH_FIELDS:
        mine = getattr(policy.arch, k)
        if meta.get(k) != mine:
            raise CheckpointError(f"{meta_file}: checkpoint {k}={meta.get(k)!r} but this model has {k}={mine!r}")
    return meta


def load_shards(policy: MegatronPolicy, directory: str | os.PathLike, load_optimizer: bool = True) -> dict[str, Any]:
    """Load shards written by ``save_shards`` into ``policy`` (collective; any TP/PP/VPP for fully_reshardable).

    ``load_optimizer``: also the optimizer state and ``steps_done`` (a resume); False loads the weights only
    (evaluation, the KL reference). RNG is not touched. Returns the meta dict; CheckpointError on a mismatch.
    """
    from megatron.core import dist_checkpointing

    path = Path(directory)
    meta = read_meta(policy, path)
    if load_optimizer:
        if meta["use_distributed_optimizer"] != policy.parallel.use_distributed_optimizer:
            raise CheckpointError(
                f"{path}: saved with use_distributed_optimizer={meta['use_distributed_optimizer']}, "
                f"this run uses {policy.parallel.use_distributed_optimizer}"
            )
        saved = meta["layout"]
        if meta["optim_sharding"] == "dp_reshardable" and (saved["tp"], saved["pp"]) != (policy.info.tp, policy.info.pp):
            raise CheckpointError(f"{path}: dp_reshardable optimizer state cannot change TP/PP {saved}")
        _prime_optimizer_state(policy.optimizer)
        sd = _sharded_state_dict(policy, is_loading=True)
        if meta["optim_sharding"] != policy.ckpt_optim_sharding:
            raise CheckpointError(f"{path}: optimizer sharding {meta['optim_sharding']} != {policy.ckpt_optim_sharding}")
    else:
        sd = _model_sharded_state_dict(policy)
    state = dist_checkpointing.load(sd, str(path))
    mods = policy.modules()
    for i, m in enumerate(mods):
        m.load_state_dict(state["model"] if len(mods) == 1 else state[f"model{i}"], strict=False)
    if load_optimizer:
        _load_optimizer_state(policy.optimizer, state["optimizer"])
        policy.steps_done = int(meta["steps_done"])
    dist.barrier()
    return meta


def _load_optimizer_state(opt: Any, state: Any) -> None:
    """Load optimizer state around two megatron issues (research/megatron_cpu.md 6.4/6.5, step 6).

    - DistributedOptimizer.load_state_dict with torch AdamW (no TE/Apex) gives every param the *same*
      ``step`` tensor, which AdamW then increments once per param per step (wrong bias correction):
      we re-create one ``step`` tensor per param from the param group's value.
    - fully_reshardable param-state loading copies into every key of the AdamW state, including ``step``,
      which it does not carry (KeyError): ``step`` is held aside while the param state is loaded.
    - fp32 main params are views of the model params: the copy must run under no_grad.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(opt, "chained_optimizers", None) or [opt]
    states = state if isinstance(state, list) else [state]
    if len(subs) != len(states):
        raise CheckpointError(f"optimizer has {len(subs)} parts but the checkpoint holds {len(states)}")
    for sub, st in zip(subs, states):
        with torch.no_grad():
            if isinstance(sub, DistributedOptimizer) and "param_state" in st:
                param_state = st.pop("param_state")
                kind = st.pop("param_state_sharding_type")
                sub.load_state_dict(st)
                _fix_adam_steps(sub)
                held = {p: s.pop("step") for p, s in sub.optimizer.state.items() if "step" in s}
                try:
                    getattr(sub, f"load_parameter_state_from_{kind}")(param_state)
                finally:
                    for p, step in held.items():
                        sub.optimizer.state[p]["step"] = step
            else:
                sub.load_state_dict(st)
                _fix_adam_steps(sub)


def _prime_optimizer_state(opt: Any) -> None:
    """Give a never-stepped optimizer zero Adam state so a checkpoint can be loaded into it.

    Without TE/Apex, DistributedOptimizer.state_dict() asserts one shared ``step`` across the (empty) state
    of a fresh optimizer: resuming in a new process would fail. Values are overwritten by the load.
    """
    for sub in getattr(opt, "chained_optimizers", None) or [opt]:
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))


def _fix_adam_steps(sub: Any) -> None:
    """One float32 ``step`` tensor per param, from the param group's ``step`` (else the param's own)."""
    inner = getattr(sub, "optimizer", None)
    if inner is None:
        return
    for g in inner.param_groups:
        for p in g["params"]:
            st = inner.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                value = float(g["step"]) if "step" in g else float(st["step"])
                st["step"] = torch.tensor(value, dtype=torch.float32)
