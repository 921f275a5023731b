"""backend/rng.py: one value holds every RNG stream, megatron's tracker included, and the layout it belongs to.

One spawned rank (megatron's parallel state and the CPU shim stay out of the pytest process). The reference is
the draws themselves: what each stream yields after a restore must equal what it yielded after the capture.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from dist_utils import spawn

pytestmark = [pytest.mark.distributed]


def _draws() -> tuple:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():  # the model-parallel stream dropout / init draw from
        tracked = torch.rand(3).tolist()
    return random.random(), float(np.random.rand()), torch.rand(2).tolist(), tracked


def _scenario(rank: int, world: int) -> None:
    from megatron_scpo.backend.parallel import init_parallel
    from megatron_scpo.backend.rng import parallel_layout, rng_state, set_rng_state

    info = init_parallel(1, 1, seed=7)
    state = rng_state()
    assert state["layout"] == info.layout == parallel_layout() == {"tp": 1, "pp": 1, "dp": 1, "vpp": 1}
    first = _draws()
    assert _draws() != first  # the streams moved on
    assert set_rng_state(state) is True
    assert _draws() == first  # every stream, the tracker's included, is back where it was captured

    # a state of another layout: the host streams come back, the tracker (per model-parallel rank) does not
    assert set_rng_state({**state, "layout": {"tp": 2, "pp": 1, "dp": 1, "vpp": 1}}) is False
    again = _draws()
    assert again[:3] == first[:3] and again[3] != first[3], (first, again)


def test_rng_state_round_trip_and_layout_guard():
    spawn(_scenario, world_size=1)
