"""The papers' math, isolated: pure torch, no I/O, imports nothing from the rest of the project.

Entry point for the trainer: ``megatron_scpo.algo.registry.build_method(cfg.algo)``; the policy loss
spec is ``megatron_scpo.algo.losses.policy_loss``. See docs/algorithms.md for the equations.
"""
