"""Trainer batching: the padded host layout, the DP split balanced by tokens, and one RL step packed vs padded.

The RL-step test runs real Megatron (world 1) with the LocalEngine on the tiny config: SCPO (its importance
scoring pass) with a k3 KL to a frozen reference (the reference pass), from the same weights and the same
rollouts, on the padded layout, packed, and packed with a token budget. Loss, gradient norm, importance and
KL agree to fp32 noise; the step reports its padding efficiency (real tokens / computed positions).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from dist_utils import spawn
from trainer_tiny import TINY_RL, parity_correct

from megatron_scpo.trainer.batching import pad_batch


def test_padded_batch_layout():
    b = pad_batch([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10], []], pad_id=0)
    assert b.seq_lens == [5, 2, 3]
    assert b.input_ids.tolist() == [[1, 2, 7, 8, 9], [3, 10, 0, 0, 0], [4, 5, 6, 0, 0]]
    sub = b.select([1, 2])
    assert sub.input_ids.shape == (2, 3) and sub.seq_lens == [2, 3]


def test_packing_config_keys():
    from megatron_scpo.config import load_config
    from megatron_scpo.configlib import ConfigError

    cfg = load_config(None, [])
    assert cfg.parallel.packed_sequences is True and cfg.parallel.max_tokens_per_micro_batch is None
    cfg = load_config(None, ["parallel.packed_sequences=false", "parallel.max_tokens_per_micro_batch=4096"])
    assert (cfg.parallel.packed_sequences, cfg.parallel.max_tokens_per_micro_batch) == (False, 4096)
    for bad, msg in ((["parallel.max_tokens_per_micro_batch=0"], ">= 1"),
                     (["parallel.pp=2", "parallel.packed_sequences=false", "parallel.max_tokens_per_micro_batch=64"],
                      "needs packed_sequences"),
                     (["parallel.packing=true"], "unknown key")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, bad)


def _fake_rt(dp: int, dp_rank: int, seen: list):
    def train_step(batch, loss_fn, mbs):
        seen.append(batch)
        return {"loss": 0.0}

    return SimpleNamespace(policy=SimpleNamespace(info=SimpleNamespace(dp=dp, dp_rank=dp_rank)),
                           train_step=train_step)


def test_train_on_balances_dp_ranks_by_tokens():
    from megatron_scpo.trainer.loss import SFTLoss
    from megatron_scpo.trainer.rl import train_on

    lengths = [60, 52, 40, 8, 8, 8, 8, 8]  # arrival order (every dp-th row): 116 vs 76 tokens
    prompts = [[1] * 4 for _ in lengths]
    responses = [[2] * (n - 4) for n in lengths]
    padded = pad_batch(prompts, responses, pad_id=0)
    rows_of = []
    for rank in range(2):
        seen: list = []
        train_on(_fake_rt(2, rank, seen), padded.train_batch(), SFTLoss(), 1, 4)
        (batch,) = seen
        rows_of.append(batch.seq_lens)
    assert sorted(rows_of[0] + rows_of[1]) == sorted(lengths)
    assert len(rows_of[0]) == len(rows_of[1]) == 4
    assert sorted([sum(rows_of[0]), sum(rows_of[1])]) == [84, 108]  # the best 4 + 4 split (LPT finds it)


def test_train_on_checks_the_whole_batch_on_every_rank():
    """A NaN in a row that only one DP rank would hold is refused on every rank, before any step (checked only
    in the backend, that rank would raise while the other waits in the step's all-reduce: a hang)."""
    from megatron_scpo.backend.seam import BatchError
    from megatron_scpo.trainer.loss import PolicyLoss
    from megatron_scpo.trainer.rl import train_on

    lengths = [60, 52, 40, 8, 8, 8, 8, 8]
    padded = pad_batch([[1] * 4 for _ in lengths], [[2] * (n - 4) for n in lengths], pad_id=0)
    b, s = padded.input_ids.shape
    rollout = torch.zeros(b, s)
    rollout[3, 5] = float("nan")  # engine log-prob of one token of a short row
    batch = padded.train_batch(advantages=torch.zeros(b, s), old_logprobs=torch.zeros(b, s), eps_low=torch.full((b,), 0.2),
                               eps_high=torch.full((b,), 0.2), rollout_logprobs=rollout)
    loss = PolicyLoss(agg="token-mean", norm_length=None, kl_coef=0.0, tis_cap=2.0, dual_clip=3.0, temperature=1.0)
    for rank in range(2):
        seen: list = []
        with pytest.raises(BatchError, match="rollout_logprobs contains NaN"):
            train_on(_fake_rt(2, rank, seen), batch, loss, 1, 4)
        assert seen == []


def test_dp_share_one_rule_for_rl_and_sft():
    """batching.dp_share: equal counts balanced by tokens, the order of ``rows`` kept (DP=1: the batch as given),
    fewer rows than ranks padded with fully masked copies; each share trimmed to its own longest row."""
    from megatron_scpo.trainer.batching import dp_share

    lengths = [60, 52, 40, 8, 8, 8, 8, 8]
    padded = pad_batch([[1] * 4 for _ in lengths], [[2] * (n - 4) for n in lengths], pad_id=0)
    batch = padded.train_batch(advantages=torch.arange(8.0)[:, None].expand(8, 60).clone())
    order = [5, 0, 7, 2]
    one = dp_share(batch, order, 1, 0)
    assert torch.equal(one.input_ids, padded.select(order).input_ids)
    assert one.advantages[:, 0].tolist() == [5.0, 0.0, 7.0, 2.0] and one.input_ids.shape[1] == 60
    shares = [dp_share(batch, range(8), 2, r) for r in range(2)]
    assert [s.size for s in shares] == [4, 4]
    assert sorted(sum(s.seq_lens) for s in shares) == [84, 108]
    assert sorted(shares[0].seq_lens + shares[1].seq_lens) == sorted(lengths)
    assert all(s.input_ids.shape[1] == max(s.seq_lens) for s in shares)
    lone = [dp_share(batch, [3], 2, r) for r in range(2)]
    assert [int(s.loss_mask.sum()) for s in lone] == [4, 0] and all(s.seq_lens == [8] for s in lone)
    with pytest.raises(ValueError, match="no rows"):
        dp_share(batch, [], 2, 0)


def _worker(rank: int, world: int, out_path: str, run_dir: str) -> None:
    from pathlib import Path

    import megatron_scpo.data.answers as answers
    from megatron_scpo.config import load_config
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.trainer.reference import ReferencePolicy
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    answers.is_correct = parity_correct  # mixed groups: SCPO scores
    cfg = load_config(None, [*TINY_RL, "name=packing", "algo.loss.kl_coef=0.5", "rl.importance_micro_batch=8",
                             "rl.mini_batches=2"])
    rt = build_runtime(cfg, Path(run_dir))
    records = PromptIterator(load_split(cfg.data, "train"), seed=0).next_batch(cfg.rl.prompts_per_step)
    params = list(rt.policy.modules()[0].parameters())
    start = [p.detach().clone() for p in params]
    rt.reference = ReferencePolicy.from_live(rt.policy)
    method = method_for(cfg, "scpo")
    out = {}
    for mode, packed, budget in (("padded", False, None), ("packed", True, None), ("budget", True, 24)):
        rt.policy.packed, rt.policy.max_tokens = packed, budget
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        rt.policy.optimizer.reload_model_params()
        for sub in getattr(rt.policy.optimizer, "chained_optimizers", None) or [rt.policy.optimizer]:
            sub.optimizer.state.clear()  # fresh Adam: the 2nd mini-batch's loss follows the 1st update
        rt.sync_weights()
        m = rl_step(rt, method, records, step=0, seed=77)
        out[mode] = {k: m[k] for k in ("loss", "grad_norm", "kl/mean", "importance/mean", "importance/responses",
                                       "length/mean", "perf/padding_efficiency", "perf/padded_layout_efficiency")
                     if k in m}
    if rank == 0:
        Path(out_path).write_text(json.dumps(out))


@pytest.mark.distributed
@pytest.mark.slow
def test_rl_step_packed_equals_padded(tmp_path):
    out = tmp_path / "out.json"
    spawn(_worker, world_size=1, args=(str(out), str(tmp_path / "run")))
    res = json.loads(out.read_text())
    pad = res["padded"]
    assert pad["importance/responses"] > 0 and pad["kl/mean"] > 0
    for mode in ("packed", "budget"):
        got = res[mode]
        print(f"[rl_step] {mode} vs padded:", {k: abs(got[k] - pad[k]) for k in pad if k in got})
        assert got["length/mean"] == pad["length/mean"]  # the same rollouts
        for k in ("loss", "kl/mean", "importance/mean"):
            assert abs(got[k] - pad[k]) < 1e-5, (mode, k, got[k], pad[k])
        assert abs(got["grad_norm"] - pad["grad_norm"]) < 1e-5 * max(1.0, pad["grad_norm"])
        assert got["perf/padding_efficiency"] > pad["perf/padding_efficiency"]
    assert res["packed"]["perf/padding_efficiency"] == 1.0  # no PP, no SP: nothing padded at all
    print("[rl_step] padding efficiency:", {m: (res[m]["perf/padding_efficiency"],
                                               res[m]["perf/padded_layout_efficiency"]) for m in res})
