"""Every random stream of a process as one value: the one home of RNG capture and restore.

Used by the trainer's checkpoints (one file per rank, ``trainer/checkpoint.py``) and around the KL reference's
model-only load (``trainer/reference.py``). The streams:

- ``python``: ``random``'s global state; ``numpy``: numpy's global generator; ``torch``: torch's CPU generator;
- ``cuda``: the current CUDA device's generator (None without a GPU; under the CPU shim torch.cuda is absent);
- ``tracker``: megatron's CUDA RNG tracker, named states forked around dropout / init
  (``model-parallel-rng`` is seeded per TP rank by ``model_parallel_cuda_manual_seed``).

The device generator and the tracker belong to one rank of one TP x PP x DP x VPP layout, so a state records
``layout`` (``parallel_layout()``) and ``set_rng_state`` restores them only under that same layout; the host
streams are always restored (a resharded resume is then as reproducible as it can be).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def parallel_layout() -> dict[str, int] | None:
    """``{"tp", "pp", "dp", "vpp"}`` of megatron's live parallel state; None before ``init_parallel``."""
    from megatron.core import parallel_state as ps

    from megatron_scpo.backend.parallel import current_info

    return current_info().layout if ps.model_parallel_is_initialized() else None


def rng_state() -> dict[str, Any]:
    """This process's RNG streams (keys above) plus ``layout``; picklable with ``torch.save``."""
    from megatron.core import tensor_parallel

    return {
        "layout": parallel_layout(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> bool:
    """Restore ``state`` (from ``rng_state``): the host streams always, the device generator and megatron's
    tracker only when ``state["layout"]`` is the live layout. Returns True when every stream was restored."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["layout"] != parallel_layout():
        return False
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    return True
