"""Fast checks that need no megatron process group: HF config parsing, layout and vocab-padding rules."""

from __future__ import annotations

import pytest
import torch

from megatron_scpo.backend.config import ParallelConfig
from megatron_scpo.backend.logprobs import mask_padded_vocab
from megatron_scpo.backend.model import UnsupportedModelError, padded_vocab_size, parse_hf_config
from megatron_scpo.backend.parallel import ParallelLayoutError, check_layout


def _cfg(**kw):
    base = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                rms_norm_eps=1e-6, rope_theta=1000000, max_position_embeddings=40960, tie_word_embeddings=True)
    base.update(kw)
    return base


def test_backend_parse_qwen3_4b_config_dict():
    a = parse_hf_config(_cfg())
    assert (a.head_dim, a.num_kv_heads, a.qk_norm, a.qkv_bias, a.rope_theta) == (128, 8, True, False, 1e6)
    assert parse_hf_config(_cfg(model_type="qwen2")).qkv_bias
    # transformers 5 style rope_parameters wins over the legacy field
    a = parse_hf_config(_cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert a.rope_theta == 5e5


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model_type="mixtral"), "unsupported architecture: model_type='mixtral'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling type 'yarn'"),
        (dict(model_type="llama", attention_bias=True), "attention_bias"),
        (dict(num_key_value_heads=5), "not a multiple of num_key_value_heads=5"),
    ],
)
def test_backend_unsupported_configs_fail_clearly(kw, match):
    with pytest.raises(UnsupportedModelError, match=match):
        parse_hf_config(_cfg(**kw))


def test_backend_padded_vocab_size():
    assert padded_vocab_size(151936, 1) == 151936  # already a multiple of 128
    assert padded_vocab_size(151665, 2) == 151808  # 593 * 256
    assert padded_vocab_size(250, 2) == 256
    assert padded_vocab_size(257, 1) == 384
    with pytest.raises(ValueError):
        padded_vocab_size(0, 1)


def test_backend_layout_errors():
    assert check_layout(8, 2, 2, num_heads=32, num_kv_heads=8, num_layers=36) == 2
    with pytest.raises(ParallelLayoutError, match="does not divide the world size 2"):
        check_layout(2, 2, 2)
    with pytest.raises(ParallelLayoutError, match="tp=3 does not divide num_attention_heads=32"):
        check_layout(3, 3, 1, num_heads=32)
    with pytest.raises(ParallelLayoutError, match="num_key_value_heads=2"):
        check_layout(4, 4, 1, num_heads=32, num_kv_heads=2)
    with pytest.raises(ParallelLayoutError, match="num_hidden_layers=36"):
        check_layout(8, 1, 8, num_layers=36)
    with pytest.raises(ValueError, match="vpp=2 needs pp > 1"):
        ParallelConfig(vpp=2).validate()


def test_backend_padded_vocab_rows_get_no_mass():
    logits = torch.randn(2, 3, 128)
    out = mask_padded_vocab(logits, vocab_size=250, tp_rank=1)  # shard [128, 256): 122 real rows
    assert torch.equal(out[..., :122], logits[..., :122])
    assert torch.softmax(out, -1)[..., 122:].sum() == 0
    assert mask_padded_vocab(logits, vocab_size=250, tp_rank=0) is logits


