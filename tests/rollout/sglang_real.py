"""Real SGLang servers for the tests: where the server venv is, a private network namespace, server configs.

The server venv is built by ``.ci/run`` from ``../shared/sglang-cpu`` (``install.sh .venv-sglang`` + sglang-router):
``SCPO_SGLANG_VENV`` names it (default ``<repo>/.venv-sglang``). Without it the real-server tests skip with the
reason, unless ``SCPO_SGLANG_REQUIRED=1`` (set by ``.ci/run`` whenever the shared folder exists): then they fail.

Network isolation (../shared/sglang-cpu/README.md): SGLang binds HTTP and ZMQ to ``--host`` but its
torch.distributed TCPStore listens on all interfaces, so the server *and its clients* (this test process, the
trainer ranks it spawns, the gloo weight-update group) must share a private network namespace whose only
interface is loopback. ``private_netns()`` puts the calling thread (pytest's main thread) into a fresh one for
the duration of a test module: network namespaces are per thread on Linux, and threads and processes started
from it afterwards (servers, ThreadPoolExecutor workers, ``mp.spawn`` ranks) inherit it. On exit the thread
goes back (``setns``) to the namespace it came from, so the rest of the session (e.g. the SLURM tests) is not
affected, and the namespace disappears with its last process. This needs CAP_SYS_ADMIN (CI runs as root);
otherwise run the tests under ``../shared/sglang-cpu/netns.sh pytest ...`` (then the process already sees only
``lo`` and nothing is unshared).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_scpo.backend.parallel import free_port

REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def sglang_venv() -> Path | None:
    """The SGLang server venv (``SCPO_SGLANG_VENV`` or ``<repo>/.venv-sglang``) if it has a python."""
    venv = Path(os.environ.get("SCPO_SGLANG_VENV") or REPO / ".venv-sglang")
    return venv if (venv / "bin" / "python").exists() else None


def sglang_python() -> str:
    """The venv's interpreter; skips (or fails under SCPO_SGLANG_REQUIRED=1) when there is no venv."""
    venv = sglang_venv()
    if venv is None:
        _unavailable("no SGLang server venv (set SCPO_SGLANG_VENV, or run ../shared/sglang-cpu/install.sh "
                     ".venv-sglang; .ci/run does both when ../shared/sglang-cpu exists)")
    return str(venv / "bin" / "python")


def _unavailable(reason: str) -> None:
    if os.environ.get("SCPO_SGLANG_REQUIRED") == "1":
        pytest.fail(f"SCPO_SGLANG_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def router_available() -> bool:
    venv = sglang_venv()
    return venv is not None and any((venv / "lib").glob("python3*/site-packages/sglang_router"))


def _only_loopback() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0)))[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))


@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    """Run the body in a private network namespace with only loopback (see the module docstring).

    Yields ``"inherited"`` when the process already is in one (netns.sh), else ``"unshared"``. Sets
    ``GLOO_SOCKET_IFNAME=lo`` meanwhile (gloo would otherwise resolve the hostname to an interface that does not
    exist in the namespace).
    """
    old_ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        if _only_loopback():
            _loopback_up()
            yield "inherited"
            return
        libc = ctypes.CDLL(None, use_errno=True)
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            if libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                _unavailable(f"cannot create a private network namespace (unshare: {os.strerror(err)}); run the "
                             "SGLang tests under ../shared/sglang-cpu/netns.sh pytest ...")
            try:
                _loopback_up()
                assert _only_loopback()
                yield "unshared"
            finally:
                if libc.setns(back, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
        finally:
            os.close(back)
    finally:
        if old_ifname is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = old_ifname


# Server flags for SGLang on CPU (../shared/sglang-cpu/README.md): the CPU engine, no overlap scheduler, a small
# KV cache (fp32 tiny models: ~1 KB/token), no warm-up request.
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
CPU_ARGS = ["--device", "cpu", "--disable-overlap-schedule", "--max-total-tokens", "4096", "--skip-server-warmup",
            "--sleep-on-idle",  # the scheduler otherwise busy-polls: ~half a core per idle server
            "--random-seed", "0"]  # fmt: skip


def real_server_kwargs(model_path: str | Path, **kw: Any) -> dict[str, Any]:
    """SGLangConfig fields for a launched real CPU server in fp32 (``kw`` overrides)."""
    base: dict[str, Any] = dict(
        model_path=str(model_path), python=sglang_python(), env=dict(CPU_ENV), dtype="float32",
        extra_args=list(CPU_ARGS), base_port=free_port(), startup_timeout_s=300.0, request_timeout_s=120.0,
        max_retries=2, retry_backoff_s=0.2, sync_backend="gloo",
    )
    base.update(kw)
    return base


def real_tiny_llama(seed: int = 0, vocab: int = 300, eos: int = 2, max_pos: int = 1024) -> LlamaForCausalLM:
    """A Llama that SGLang's CPU backend runs (head_dim 64; README: hidden 128, 2 heads, 1 KV head), fp32, random
    under ``seed`` with larger weights than the default init so greedy output varies."""
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=eos,
        pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


def wait_for(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.05)


def pids_alive(pids: list[int]) -> list[int]:
    """The PIDs that still run (zombies count as gone)."""
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(p)
    return out
