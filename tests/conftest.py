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
