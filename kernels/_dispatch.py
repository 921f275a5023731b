"""Dispatch between Triton kernels and torch references, plus shared input checks.

Triton is optional (CPU production needs only torch). Whether kernels are interpreted is frozen when
triton is first imported (``TRITON_INTERPRET``), so it is read once here.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch"]

try:  # triton is an optional extra; a CPU install runs the torch paths only
    import triton

    HAS_TRITON = True
    INTERPRET = bool(triton.knobs.runtime.interpret)
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    INTERPRET = False

class NonFiniteError(ValueError):
    """A kernel met NaN/inf where the math needs finite values (e.g. NaN logits).

    Its own class so callers can react to exactly this (the trainer skips the optimizer step on a NaN loss)
    without string-matching messages; a ValueError subclass, so ``except ValueError`` still catches it.
    """


#: Number of Triton launches per kernel name; tests read it to prove the Triton path really ran.
LAUNCHES: dict[str, int] = {}


def count_launch(name: str) -> None:
    LAUNCHES[name] = LAUNCHES.get(name, 0) + 1


def resolve_impl(impl: str, ref: torch.Tensor) -> Literal["triton", "torch"]:
    """``auto`` -> Triton on CUDA tensors, torch elsewhere; ``triton`` must be runnable or we say why."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if os.environ.get("SCPO_DISABLE_TRITON") == "1" and impl == "auto":
        return "torch"
    if impl == "auto":
        return "triton" if (HAS_TRITON and ref.is_cuda) else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError("impl='triton' but triton is not installed (pip install .[triton])")
        if not (ref.is_cuda or INTERPRET):
            raise ValueError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return impl  # type: ignore[return-value]


def check_2d(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_contiguous(names_and_tensors: dict[str, torch.Tensor | None]) -> None:
    """The Triton paths index with flat offsets; refuse rather than silently copy large tensors."""
    for name, t in names_and_tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for impl='triton' (call .contiguous()), got strides {t.stride()}")


def check_same_device(names_and_tensors: dict[str, torch.Tensor | None]) -> None:
    devices = {n: t.device for n, t in names_and_tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
