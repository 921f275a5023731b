"""Rollout engine section of the experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_scpo.configlib import check_min


@dataclass
class SGLangConfig:
    """SGLang servers: launched and supervised by us (``urls`` empty) or attached to (``urls`` given)."""

    router_url: str | None = None  # generate through an sglang-router; weight sync still goes to each worker URL
    model_path: str | None = None  # HF checkpoint dir the servers start from (launch mode; disk-sync config files)
    num_servers: int = 1  # launch mode: servers started on this node
    tp_size: int = 1
    host: str = "127.0.0.1"
    base_port: int = 30000  # server i listens on base_port + i
    base_gpu_id: int = 0  # server i uses GPUs base_gpu_id + i*tp_size ...
    mem_fraction_static: float | None = None
    context_length: int | None = None
    dtype: str = "auto"
    extra_args: list[str] = field(default_factory=list)  # appended verbatim to the launch command line
    # Servers live in their own environment (SGLang's image/venv, not the trainer's): the interpreter that runs
    # ``-m sglang.launch_server`` (launch mode and the SLURM plan's servers: ``sglang.build_launch_command``; the plan's
    # router).
    # None: this process's interpreter in launch mode, ``python3`` in plans.
    python: str | None = None
    launcher: list[str] = field(default_factory=list)  # launch mode: command prefix, e.g. [apptainer, exec, img.sif]
    env: dict[str, str] = field(default_factory=dict)  # launch mode: extra server environment (SGLANG_USE_CPU_ENGINE)
    log_dir: str | None = None  # server stdout/stderr files (default: a temp dir)
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 900.0
    max_retries: int = 3  # per request, on connection errors / timeouts / 5xx
    retry_backoff_s: float = 1.0  # doubles per attempt
    max_batch_per_request: int = 256  # input_ids rows per /generate call
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    weight_bucket_mb: float = 512.0  # >= 512 MB buckets keep sync fast on GPU (anchors 4.1)
    sync_master_addr: str = "127.0.0.1"  # distributed sync: trainer rank 0 address, reachable from the servers
    sync_master_port: int = 0  # 0 = pick a free port
    sync_backend: Literal["nccl", "gloo"] = "nccl"
    disk_sync_dir: str | None = None  # disk sync: where versioned checkpoints are written (shared filesystem)
    pause_mode: Literal["abort", "retract", "in_place"] = "abort"

    def validate(self) -> None:
        check_min(self, 0, "weight_bucket_mb", "startup_timeout_s", "request_timeout_s", strict=True)
        check_min(self, 1, "num_servers", "tp_size", "max_batch_per_request")
        check_min(self, 0, "max_retries")
        if self.python is not None and not self.python.strip():
            raise ValueError("rollout.sglang.python must be a non-empty interpreter path (or null)")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")


@dataclass
class RolloutConfig:
    """How samples are generated: in-process (CPU default) or SGLang servers."""

    engine: Literal["local", "sglang"] = "local"
    n_samples: int = 8  # group size G
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    sglang_urls: list[str] = field(default_factory=list)  # attach to running servers
    logprob_tolerance: float = 1e-3  # post-sync check, max |engine - trainer| log-prob
    check_num_sequences: int = 4  # post-sync check: fixed sequences scored by engine and trainer
    check_seq_len: int = 32
    local_max_batch_size: int = 256  # LocalEngine rows decoded together
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def validate(self) -> None:
        check_min(self, 1, "n_samples", "max_new_tokens", "check_num_sequences", "local_max_batch_size")
        check_min(self, 2, "check_seq_len")
        check_min(self, 0, "temperature", "logprob_tolerance", strict=True)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
