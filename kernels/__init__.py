"""Fused kernels (installed as ``scpo_kernels``): Triton kernels, torch references, dispatch.

Every op takes ``impl="auto"|"triton"|"torch"``: ``auto`` runs Triton on CUDA tensors and the torch
path (memory-lean, the CPU production path) elsewhere. See docs/kernels.md.
"""

from ._dispatch import HAS_TRITON, INTERPRET, resolve_impl
from .logprobs import fused_logprobs, linear_logprobs

__all__ = ["HAS_TRITON", "INTERPRET", "fused_logprobs", "linear_logprobs", "resolve_impl"]
