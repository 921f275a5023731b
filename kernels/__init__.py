"""Fused kernels (installed as ``scpo_kernels``): Triton kernels, torch references, dispatch."""
