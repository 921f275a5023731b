"""torch.distributed + megatron parallel state: TP x PP x DP (DP is what remains of the world).

One entry point for every launcher: torchrun / srun env vars, an already-initialized process group (tests'
``dist_utils.spawn``), or a bare single process (no env vars: a private 1-rank group). Layout errors are
raised before any process group is created, so a bad config fails fast and the same on every rank.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_scpo.backend import cpu_shim


class ParallelLayoutError(ValueError):
    """The requested TP/PP/VPP layout does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the TP x PP x DP grid (megatron order tp-cp-ep-dp-pp)."""

    tp: int
    pp: int
    dp: int
    vpp: int
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def layout(self) -> dict[str, int]:
        """``{"tp", "pp", "dp", "vpp"}``: what checkpoints record (per-rank state is valid only under it)."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "vpp": self.vpp}


def check_layout(
    world_size: int,
    tp: int,
    pp: int,
    *,
    vpp: int = 1,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    num_layers: int | None = None,
) -> int:
    """Validate a layout and return DP; every violation is a ParallelLayoutError naming the numbers."""
    for name, v in (("tp", tp), ("pp", pp), ("vpp", vpp)):
        if not isinstance(v, int) or v < 1:
            raise ParallelLayoutError(f"parallel.{name} must be an integer >= 1, got {v!r}")
    if world_size % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"tp*pp = {tp}*{pp} = {tp * pp} does not divide the world size {world_size} (DP = world / (tp*pp))"
        )
    if num_heads is not None and num_heads % tp != 0:
        raise ParallelLayoutError(f"tp={tp} does not divide num_attention_heads={num_heads}")
    if num_kv_heads is not None and num_kv_heads % tp != 0:
        raise ParallelLayoutError(f"tp={tp} does not divide num_key_value_heads={num_kv_heads}")
    if vpp > 1 and pp == 1:
        raise ParallelLayoutError(f"vpp={vpp} needs pp > 1")
    if num_layers is not None and num_layers % (pp * vpp) != 0:
        raise ParallelLayoutError(f"pp*vpp = {pp}*{vpp} does not divide num_hidden_layers={num_layers}")
    return world_size // (tp * pp)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it; another process may take it before use).

    The one helper for rendezvous ports: this module's private 1-rank group and the rollout engine's
    weight-update group (``rollout.sglang``) use it.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group(backend: str | None, timeout_minutes: int) -> str:
    """Init torch.distributed once: env vars if present, else a private single-rank group."""
    if dist.is_initialized():
        return dist.get_backend()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timeout
        )
    return backend


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    *,
    vpp: int = 1,
    seed: int = 1234,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    num_layers: int | None = None,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> ParallelInfo:
    """Initialize torch.distributed (if needed), megatron's parallel state and its RNG tracker.

    Re-initializing with another layout in the same process (e.g. save at TP=2, load at PP=2) is allowed:
    the previous megatron state is destroyed first. The CPU shim is applied here when CUDA is absent.
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    check_layout(world, tp, pp, vpp=vpp, num_heads=num_heads, num_kv_heads=num_kv_heads, num_layers=num_layers)
    cpu_shim.apply()
    used_backend = _ensure_process_group(backend, timeout_minutes)
    if dist.get_world_size() != world:  # env said one thing, the live group another
        check_layout(dist.get_world_size(), tp, pp, vpp=vpp, num_heads=num_heads, num_kv_heads=num_kv_heads)

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_info(backend=used_backend)


def current_info(backend: str | None = None) -> ParallelInfo:
    """The live layout (after init_parallel)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialized: call init_parallel() first")
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    return ParallelInfo(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        vpp=vpp,
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        backend=backend or dist.get_backend(),
    )


def destroy_parallel(process_group: bool = False) -> None:
    """Tear down megatron's parallel state (and optionally torch.distributed)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()


# ---- process-group helpers for code that also runs without one (a single process: no group, or world 1) ----
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``: the live process group's, else the launcher's env vars (RANK, WORLD_SIZE), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """``dist.barrier()`` when there is more than one rank; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from ``src`` to every rank (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
