"""Run a function on N gloo ranks (real torch.distributed, one process per rank).

Used by every 2-process test (vocab-parallel kernels, Megatron TP/PP/DP). Failures in any rank
re-raise in the test with the rank's traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_scpo.backend.parallel import free_port


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    # A finite timeout turns a collective mismatch into an error instead of a hung CI job.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    fn(rank, world_size, *args)  # on error, no barrier: mp.spawn reports it and terminates the peers
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int = 2, args: tuple = ()) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; fn must be module-level."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
