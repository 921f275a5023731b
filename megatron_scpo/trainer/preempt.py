"""Graceful preemption: SIGTERM or the ``$SCPO_STOP_FILE`` asks the trainer to checkpoint and exit.

The SLURM launcher (launch/common.sh, docs/launch.md section 5) touches ``RUN_DIR/STOP`` and sends SIGTERM,
then waits ``SCPO_STOP_GRACE`` seconds before killing. The signal handler only sets a flag: the current
step always finishes (a half step cannot be checkpointed), then ``StopRequest.poll`` (a collective, called
between steps on every rank) decides. The decision is an all-reduce MAX of every rank's view (its own
SIGTERM; on rank 0 also the stop file), so every rank agrees and they all write the same checkpoint.

The trainer then exits with ``PREEMPTED_EXIT_CODE`` (143 = 128 + SIGTERM, what node.sh and a process
killed by SIGTERM report too): "stopped on request, resumable", distinct from success (0), bad input (2)
and crashes (1). The next attempt with the same run dir resumes from that checkpoint exactly.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 143
STOP_FILE_ENV = "SCPO_STOP_FILE"


class Preempted(Exception):
    """Raised after the stop checkpoint is written; ``scpo train`` turns it into ``PREEMPTED_EXIT_CODE``."""


class StopRequest:
    """Stop flag fed by SIGTERM and the stop file; ``poll()`` is the collective decision."""

    def __init__(self, rank: int = 0, stop_file: str | os.PathLike | None = None):
        self.rank = rank
        env = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(stop_file) if stop_file is not None else (Path(env) if env else None)
        # A stop file older than this process is a leftover of an earlier attempt, not a request to us.
        self.started = time.time()
        self.signalled = False
        self.stopped = False  # the collective decision, sticky once taken
        self._previous: Any = None

    def install(self) -> None:
        """Route SIGTERM to the flag (main thread only; elsewhere SIGTERM keeps its default)."""
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread (e.g. an embedding test harness)
            self._previous = None

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.signalled:
            print(f"[stop] rank {self.rank}: SIGTERM received, stopping after the current step", flush=True)
        self.signalled = True

    def _file_requested(self) -> bool:
        if self.stop_file is None:
            return False
        try:
            return self.stop_file.stat().st_mtime >= self.started - 1.0
        except OSError:
            return False

    def local(self) -> bool:
        """This rank's view: its own SIGTERM, and on rank 0 the stop file (one reader of the shared FS)."""
        return self.signalled or (self.rank == 0 and self._file_requested())

    def poll(self) -> bool:
        """Collective: True on every rank when any rank wants to stop. Call it at the same point on all ranks."""
        if self.stopped:
            return True
        flag = self.local()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        self.stopped = flag
        return flag
