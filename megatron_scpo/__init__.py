"""megatron_scpo: step-level length-control RL post-training on Megatron-Core."""

__version__ = "0.1.0"
