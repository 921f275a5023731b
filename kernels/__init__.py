"""Fused kernels (installed as ``scpo_kernels``): Triton kernels, torch references, dispatch.

Every op takes ``impl="auto"|"triton"|"torch"``: ``auto`` runs Triton on CUDA tensors and the torch
path (memory-lean, the CPU production path) elsewhere. See docs/kernels.md.
"""

from ._dispatch import HAS_TRITON, INTERPRET, LAUNCHES, NonFiniteError, resolve_impl
from .gae import discounted_suffix_sum, segmented_gae
from .logprobs import fused_logprobs, linear_logprobs
from .policy_loss import AGG_MODES, agg_units, aggregate, check_loss_options, policy_loss

__all__ = [
    "AGG_MODES", "HAS_TRITON", "INTERPRET", "LAUNCHES", "NonFiniteError", "agg_units", "aggregate", "check_loss_options",
    "discounted_suffix_sum", "fused_logprobs", "linear_logprobs", "policy_loss", "resolve_impl", "segmented_gae",
]
