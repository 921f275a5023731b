"""metrics.py's name contract: one spelling per logged name, and no name minted by two producers."""

from __future__ import annotations

import pytest
import torch

from megatron_scpo.algo.config import AlgoConfig
from megatron_scpo.algo.registry import METHODS, GroupedRollouts, build_method
from megatron_scpo.trainer.metrics import IMPORTANCE_MEAN, STDOUT_KEYS, TRAINER_ROLLOUT_METRICS
from megatron_scpo.trainer.rollouts import Rollouts, rollout_stats


def _grouped() -> GroupedRollouts:
    step_ids = torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1], [0, 0, -1, -1], [0, 1, 1, -1]])
    return GroupedRollouts(group_ids=torch.tensor([0, 0, 1, 1]), correct=torch.tensor([True, False, False, True]),
                           response_lengths=(step_ids >= 0).sum(1), step_ids=step_ids, response_mask=step_ids >= 0,
                           truncated=torch.zeros(4, dtype=torch.bool), prompt_keys=["a", "a", "b", "b"],
                           step_importance=[torch.tensor([0.9, 0.2]), None, None, torch.tensor([0.7, 0.5])])


def test_trainer_rollout_metrics_are_what_the_trainer_mints():
    r = Rollouts(response_ids=[[1, 2], [3]], correct=[True, False], finish_reasons=["stop", "length"])
    assert set(rollout_stats(r, 1.0)) | {IMPORTANCE_MEAN, "importance/scored_sequences", "importance/responses"} \
        == TRAINER_ROLLOUT_METRICS
    assert {"acc/mean", "length/mean"} <= set(STDOUT_KEYS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_do_not_mint_trainer_metric_names(name):
    """rl_step merges the method's metrics first and the trainer's after: a shared name would be computed twice
    and one value would silently win."""
    out = build_method(AlgoConfig(method=name)).compute(_grouped())
    assert not set(out.metrics) & TRAINER_ROLLOUT_METRICS
