"""Frozen reference policy for the k3 KL term (``algo.loss.kl_coef > 0``, e.g. LAPO's 1e-4).

The reference is the RL-start weights (snapshot ``rl_start``). Memory-lean choice: no second model and
no second optimizer. Each rank keeps a host (CPU) copy of *its own* parameter shards of the reference;
the reference log-prob pass swaps them into the live model, runs the ordinary forward-only pass, and
swaps the trained weights back. Cost per RL step: one extra forward plus two device<->host copies of
this rank's shards; extra memory: two shard-sized host buffers (reference + the parked live weights),
nothing on the accelerator. A second MegatronPolicy would hold a full extra model (and megatron's
global parallel state allows only one layout per process anyway).

The swap touches only the model parameters. The optimizer's fp32 main params (bf16 runs) are separate
tensors and stay as they are; in fp32 runs the live values are restored bit for bit before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_scpo.backend.rng import rng_state, set_rng_state
from megatron_scpo.trainer.batching import PaddedBatch


def _params(policy: Any) -> list[torch.Tensor]:
    return [p for m in policy.modules() for p in m.parameters()]


class ReferencePolicy:
    """Host copy of this rank's reference shards; ``logprobs`` is collective like Runtime.logprobs."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights
        self._parked = [torch.empty_like(w) for w in weights]

    @classmethod
    def from_live(cls, policy: Any) -> ReferencePolicy:
        """The live weights are the reference (the RL phase starts from ``rl_start`` right now)."""
        return cls([p.detach().to("cpu", copy=True) for p in _params(policy)])

    @classmethod
    def from_checkpoint(cls, policy: Any, model_dir: Path) -> ReferencePolicy:
        """Read the reference from a checkpoint's backend shards (``<ckpt>/model``) without disturbing the live run.

        The model-only load goes through the live model (the backend's resharding load), then the live
        weights and every RNG stream (``backend.rng``) come back, so an exact resume stays exact.
        """
        parked = [p.detach().to("cpu", copy=True) for p in _params(policy)]
        rng = rng_state()
        policy.load_shards(model_dir, load_optimizer=False)
        ref = cls.from_live(policy)
        with torch.no_grad():
            for p, w in zip(_params(policy), parked):
                p.copy_(w)
        set_rng_state(rng)
        return ref

    @torch.no_grad()
    def logprobs(self, rt: Any, padded: PaddedBatch, temperature: float) -> torch.Tensor:
        """Reference log-probs ``[B, S]`` of ``padded`` (swap in, forward, swap back even on error)."""
        params = _params(rt.policy)
        for p, w, park in zip(params, self.weights, self._parked):
            park.copy_(p)
            p.copy_(w)
        try:
            return rt.logprobs(padded, temperature=temperature)
        finally:
            for p, park in zip(params, self._parked):
                p.copy_(park)
