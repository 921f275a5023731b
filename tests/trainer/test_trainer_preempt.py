"""StopRequest: SIGTERM sets a flag (the process lives on), the stop file counts only when newer than the
process, only rank 0 reads it. The cross-rank agreement runs inside the 2-rank test of test_trainer_rl_step.py
and the end-to-end SIGTERM -> checkpoint -> exit 143 -> exact resume in test_trainer_resume.py."""

from __future__ import annotations

import os
import signal
import time

from megatron_scpo.trainer.preempt import STOP_FILE_ENV, StopRequest


def test_sigterm_sets_flag_and_uninstall_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    s = StopRequest(rank=0, stop_file=None)
    s.install()
    try:
        assert not s.poll()
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        time.sleep(0.05)
        assert s.signalled and s.poll() and s.stopped
    finally:
        s.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_file_fresh_vs_stale_and_rank(tmp_path, monkeypatch):
    stop = tmp_path / "STOP"
    stop.touch()
    os.utime(stop, (time.time() - 3600, time.time() - 3600))  # a leftover of an earlier attempt
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    r0, r1 = StopRequest(rank=0), StopRequest(rank=1)
    assert r0.stop_file == stop and not r0.poll()
    stop.touch()  # the launcher asks now
    assert r0.poll() and not r1.local()  # only rank 0 reads the file; ranks agree through poll's all-reduce
    monkeypatch.delenv(STOP_FILE_ENV)
    assert StopRequest(rank=0).stop_file is None and not StopRequest(rank=0).poll()
