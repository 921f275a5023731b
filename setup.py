"""Packaging for megatron_scpo.

The top-level ``kernels/`` folder is installed under the import name ``scpo_kernels``: a bare
top-level ``kernels`` module would shadow Hugging Face's ``kernels`` package, which transformers
probes for at import time (and then tries to use).

Apex is optional and not on PyPI (NVIDIA builds it from source): without it megatron-core falls
back to torch norms and optimizers. flash-attn and sglang are GPU-node extras (``pip install .[gpu]``).
"""

from setuptools import find_packages, setup

setup(
    name="megatron_scpo",
    version="0.1.0",
    description="Step-level length-control RL post-training (SmartThinker/SCPO, LAPO, calibration) on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_scpo", "megatron_scpo.*"]) + ["scpo_kernels"],
    package_dir={"scpo_kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "pyyaml>=6",
        "math-verify>=0.7",  # brings latex2sympy2_extended + antlr4 runtime
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "requests>=2.28",
        "numpy>=1.24",
        "psutil>=5.9",  # megatron dist-checkpointing save needs it (undeclared upstream)
        "matplotlib>=3.7",
        "pyarrow>=14",
        "gguf>=0.10",  # `scpo convert gguf-to-hf`: transformers reads GGUF files with it ...
        "accelerate>=1.0",  # ... and needs accelerate to load them
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.5", "champ-dataset>=1.0"],  # CHAMP: real-data tests
        "triton": ["triton>=3.2"],
        "bench": ["trl>=1.16"],  # benchmarks/bench_rl_step.py: our RL step vs TRL's GRPOTrainer (pulls datasets)
        "gpu": ["flash-attn", "sglang[all]>=0.4.6", "sglang-router", "triton>=3.2"],
    },
    entry_points={"console_scripts": ["scpo=megatron_scpo.cli:main"]},
)
