"""SFTCursor: the saved SFT data position (JSON in trainer_state.json) continues the same batch sequence."""

from __future__ import annotations

import json
import random

import pytest

from megatron_scpo.trainer.config import RejectionSFTConfig, SFTConfig
from megatron_scpo.trainer.sft import SFTCursor


def _reference_batches(stage: str, seed: int, n: int, batch: int, steps: int) -> list[list[int]]:
    """Independent re-derivation: concatenated seeded epoch permutations, cut into batches."""
    rng = random.Random(f"sft:{stage}:{seed}")
    stream: list[int] = []
    while len(stream) < batch * steps:
        epoch = list(range(n))
        rng.shuffle(epoch)
        stream += epoch
    return [stream[i * batch:(i + 1) * batch] for i in range(steps)]


@pytest.mark.parametrize("cut", [0, 1, 3, 5])
def test_cursor_roundtrip_through_json_continues_the_same_order(cut):
    n, batch, steps = 7, 3, 9  # batches straddle epoch boundaries
    ref = _reference_batches("warmstart", 11, n, batch, steps)
    a = SFTCursor("warmstart", 11, n)
    got = [a.next_batch(batch) for _ in range(cut)]
    a.step = cut
    sd = json.loads(json.dumps(a.state_dict()))
    b = SFTCursor("warmstart", 11, n)
    b.load_state_dict(sd)
    assert b.step == cut
    got += [b.next_batch(batch) for _ in range(steps - cut)]
    assert got == ref


def test_cursor_rejects_a_position_of_other_data():
    sd = SFTCursor("stage1", 1, 5).state_dict()
    with pytest.raises(ValueError, match="stage1"):
        SFTCursor("stage1", 1, 6).load_state_dict(sd)
    with pytest.raises(ValueError, match="warmstart"):
        SFTCursor("warmstart", 1, 5).load_state_dict(sd)


def test_negative_checkpoint_interval_is_rejected():
    with pytest.raises(ValueError, match="checkpoint_interval"):
        SFTConfig(checkpoint_interval=-1).validate()
    with pytest.raises(ValueError, match="checkpoint_interval"):
        RejectionSFTConfig(checkpoint_interval=-1).validate()
