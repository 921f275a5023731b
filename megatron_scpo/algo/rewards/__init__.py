"""Reward functions: SCPO step rewards, LAPO, progressive calibration and baselines (pure torch)."""
