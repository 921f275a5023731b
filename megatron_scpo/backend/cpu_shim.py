"""Make megatron-core run on a CPU-only torch build (gloo), without forking megatron.

Megatron-core hard-codes CUDA in a handful of places (device arguments, the CUDA RNG tracker, streams,
``Tensor.type()`` dispatch, ``torch.cuda.synchronize``). Each patch below fixes one family of call sites,
found and verified in research/megatron_cpu.md (sections 3-4); with them, TP/PP/DP, the pipeline schedules,
DDP, the distributed optimizer and dist-checkpointing give the same numbers as a single-process reference.

The patches are process-wide monkeypatches of ``torch.cuda`` / ``torch.Tensor`` and one megatron class, so
they are applied **only when CUDA is absent** (``apply()`` is a no-op on a GPU machine) and at most once.
Patch by patch:

- ``current_device``: ``torch.cuda.current_device()`` returns ``"cpu"``; megatron passes it as ``device=``
  (rotary embeddings, the attention memory buffer, P2P receive buffers, DDP grad buffers).
- ``rng``: the model-parallel CUDA RNG tracker (``model_parallel_cuda_manual_seed``, ``fork()`` in every
  attention forward) reads/writes the CPU generator instead; ``torch.cuda.manual_seed`` is otherwise a
  silent no-op on a CPU build, so seeds would never take effect.
- ``device_mode``: a process-wide ``TorchFunctionMode`` rewriting ``device="cuda"`` keyword arguments and
  ``.to("cuda")`` / ``.cuda()`` to CPU (pipeline schedules' token counters, optimizer / grad-clip scalars,
  fully-parallel checkpoint exchange). The most invasive patch: it would hide our own "cuda" bugs, which is
  why it never runs on a GPU machine.
- ``sync``: ``torch.cuda.synchronize`` is a no-op (dist-checkpointing save, batched P2P sync).
  We also build configs with ``batch_p2p_sync=False`` so the schedules never ask for it.
- ``streams``: fake ``torch.cuda.Stream / Event / current_stream / stream()`` (DDP grad-sync streams).
- ``type_str``: ``Tensor.type()`` reports CPU float tensors as ``torch.cuda.*Tensor``: the distributed
  optimizer dispatches on these strings when it builds its main-param groups.
- ``tensor_cuda``: ``Tensor.cuda`` is the identity (dist-checkpointing exchange utilities).
- ``sp_norm``: megatron's ``WrappedTorchNorm`` asserts that sequence parallelism is off (only Apex / TE norms
  support it). The replacement builds the same torch LayerNorm/RMSNorm and tags its parameters
  ``sequence_parallel=True`` so ``finalize_model_grads`` all-reduces their grads over TP, as TENorm does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

ALL_PATCHES: tuple[str, ...] = (
    "current_device",
    "rng",
    "device_mode",
    "sync",
    "streams",
    "type_str",
    "tensor_cuda",
    "sp_norm",
)

_applied: set[str] = set()
_device_mode: Any = None


def needed() -> bool:
    """True when this process has no usable CUDA: only then may the shim touch torch."""
    return not torch.cuda.is_available()


def applied() -> frozenset[str]:
    """The patches active in this process."""
    return frozenset(_applied)


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(*_a: Any, **_k: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(state: torch.Tensor, *_a: Any, **_k: Any) -> None:
        torch.set_rng_state(state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_state  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.random.set_rng_state = set_state  # type: ignore[assignment]
    # Not torch.manual_seed: that itself calls torch.cuda.manual_seed_all (infinite recursion).
    def seed_cpu(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.manual_seed = seed_cpu  # type: ignore[assignment]
    torch.cuda.manual_seed_all = seed_cpu  # type: ignore[assignment]


class _CpuDeviceMode(torch.overrides.TorchFunctionMode):
    """Redirect ``device="cuda"`` / ``.to("cuda")`` / ``.cuda()`` to CPU for every torch call."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _patch_device_mode() -> None:
    global _device_mode
    _device_mode = _CpuDeviceMode()
    _device_mode.__enter__()  # stays on the mode stack for the life of the process


def _patch_sync() -> None:
    torch.cuda.synchronize = lambda *_a, **_k: None  # type: ignore[assignment]


class _FakeStream:
    """Stands in for torch.cuda.Stream / Event: every wait/record/sync is a no-op on CPU."""

    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *_a, **_k: None

    def query(self) -> bool:
        return True


def _patch_streams() -> None:
    fake = _FakeStream()
    torch.cuda.Stream = _FakeStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _FakeStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *_a, **_k: fake  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *_a, **_k: fake  # type: ignore[assignment]
    torch.cuda.stream = lambda *_a, **_k: contextlib.nullcontext()  # type: ignore[assignment]


def _patch_type_str() -> None:
    orig = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        # (under device_mode this function can re-enter itself once: never prefix twice)
        if not args and not kwargs and isinstance(out, str) and out.startswith("torch.") and self.device.type == "cpu":
            if not out.startswith("torch.cuda."):
                return out.replace("torch.", "torch.cuda.", 1)
        return out

    torch.Tensor.type = type_  # type: ignore[method-assign]


def _patch_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *_a, **_k: self  # type: ignore[method-assign]


def _patch_sp_norm() -> None:
    from megatron.core.transformer import torch_norm

    def new(cls: type, config: Any, hidden_size: int, eps: float = 1e-5, **_k: Any) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported on the CPU path")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new  # type: ignore[method-assign]


_PATCHERS = {
    "current_device": _patch_current_device,
    "rng": _patch_rng,
    "device_mode": _patch_device_mode,
    "sync": _patch_sync,
    "streams": _patch_streams,
    "type_str": _patch_type_str,
    "tensor_cuda": _patch_tensor_cuda,
    "sp_norm": _patch_sp_norm,
}


def apply(names: Iterable[str] | None = None) -> frozenset[str]:
    """Apply the named patches (default: all) if CUDA is absent; idempotent. Returns the active set."""
    wanted = list(ALL_PATCHES if names is None else names)
    unknown = [n for n in wanted if n not in _PATCHERS]
    if unknown:
        raise ValueError(f"unknown CPU shim patch(es) {unknown}; known: {list(ALL_PATCHES)}")
    if not needed():
        return frozenset(_applied)
    for name in wanted:
        if name not in _applied:
            _PATCHERS[name]()
            _applied.add(name)
    return frozenset(_applied)
