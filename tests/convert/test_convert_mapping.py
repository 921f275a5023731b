"""Layout math and file handling of the converter, in-process (no megatron parallel state, no processes)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from convert_tiny import ARCHS, VOCAB, hf_state_dict, save_tiny, tiny_config, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from megatron_scpo.backend.model import HFArch, parse_hf_config
from megatron_scpo.convert import hf_io
from megatron_scpo.convert.live import _tp_slice
from megatron_scpo.convert.mapping import (
    ConversionError,
    McoreParam,
    arch_info,
    fuse_qkv,
    hf_to_mcore,
    mcore_to_hf,
    split_qkv,
)


def _info(ng: int, hpg: int, hd: int, hidden: int = 3) -> HFArch:
    return parse_hf_config({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": hidden,
                            "num_attention_heads": ng * hpg, "num_key_value_heads": ng, "head_dim": hd,
                            "intermediate_size": 4, "vocab_size": 10})


def test_fuse_qkv_hand_computed_gqa():
    # 2 KV groups, 2 query heads per group, head_dim 1: Megatron interleaves [q q k v] per group.
    info = _info(ng=2, hpg=2, hd=1)
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])
    assert fuse_qkv(q, k, v, info).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


@given(ng=st.integers(1, 4), hpg=st.integers(1, 4), hd=st.integers(1, 4), bias=st.booleans())
def test_fuse_qkv_matches_loop_reference_and_inverts(ng, hpg, hd, bias):
    info = _info(ng, hpg, hd)
    tail = () if bias else (3,)
    q = torch.randn(ng * hpg * hd, *tail)
    k, v = torch.randn(ng * hd, *tail), torch.randn(ng * hd, *tail)
    rows = []
    for g in range(ng):  # reference: per group, its query heads, then its k head, then its v head
        for j in range(hpg):
            h = g * hpg + j
            rows.append(q[h * hd:(h + 1) * hd])
        rows += [k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    fused = fuse_qkv(q, k, v, info)
    assert torch.equal(fused, torch.cat(rows))
    q2, k2, v2 = split_qkv(fused, info)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_tp_slice_of_fused_fc1_takes_each_half():
    full = torch.arange(8.0).reshape(8, 1)  # gate rows 0..3, up rows 4..7
    p = McoreParam("decoder.layers.0.mlp.linear_fc1.weight", "fc1", ("g", "u"), 0)
    assert _tp_slice(p, full, 2, 0).flatten().tolist() == [0, 1, 4, 5]
    assert _tp_slice(p, full, 2, 1).flatten().tolist() == [2, 3, 6, 7]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("norms", ["local", "te"])
def test_state_dict_round_trip_is_bitwise(arch, norms):
    model = tiny_model(arch)
    hf = hf_state_dict(model)
    info = arch_info(model.config)
    mc = hf_to_mcore(hf, info, padded_vocab=384, norms=norms)
    emb = mc["embedding.word_embeddings.weight"]
    assert emb.shape == (384, 64) and torch.count_nonzero(emb[VOCAB:]) == 0  # zero padding rows
    assert torch.equal(emb[:VOCAB], hf["model.embed_tokens.weight"])
    assert ("output_layer.weight" in mc) == (not model.config.tie_word_embeddings)
    ln = "self_attention.linear_qkv.layer_norm_weight" if norms == "te" else "input_layernorm.weight"
    assert torch.equal(mc[f"decoder.layers.1.{ln}"], hf["model.layers.1.input_layernorm.weight"])
    fc1 = mc["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:128], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[128:], hf["model.layers.0.mlp.up_proj.weight"])
    back = mcore_to_hf(mc, info)  # norm naming detected
    assert set(back) == set(hf)
    for k, v in hf.items():
        assert torch.equal(back[k], v), k


def test_qwen3_qk_norm_and_qwen2_bias_are_mapped():
    q3 = tiny_model("qwen3")
    mc = hf_to_mcore(hf_state_dict(q3), arch_info(q3.config), 384)
    assert torch.equal(mc["decoder.layers.0.self_attention.q_layernorm.weight"],
                       q3.state_dict()["model.layers.0.self_attn.q_norm.weight"])
    assert mc["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 32, 64)
    q2 = tiny_model("qwen2_tied")
    mc2 = hf_to_mcore(hf_state_dict(q2), arch_info(q2.config), 384)
    assert mc2["decoder.layers.0.self_attention.linear_qkv.bias"].shape == ((4 + 2 * 2) * 16,)


def test_config_errors_name_the_problem():
    cfg = tiny_config("llama").to_dict()
    with pytest.raises(ConversionError, match="unsupported architecture.*gpt2"):
        arch_info({**cfg, "model_type": "gpt2"}, "x/config.json")
    with pytest.raises(ConversionError, match="x/config.json.*hidden_act"):
        arch_info({**cfg, "hidden_act": "gelu"}, "x/config.json")
    with pytest.raises(ConversionError, match=r"x/config.json: llama: missing field\(s\) \['num_hidden_layers'\]"):
        arch_info({k: v for k, v in cfg.items() if k != "num_hidden_layers"}, "x/config.json")
    # one parsed form: the converter's view is the model builder's HFArch (HF field names)
    a = arch_info(cfg)
    assert a == parse_hf_config(tiny_config("llama")) and (a.hidden_size, a.vocab_size) == (cfg["hidden_size"], VOCAB)
    assert a.qkv_rows == (a.num_heads + 2 * a.num_kv_heads) * a.head_dim and a.heads_per_group * a.num_kv_heads == a.num_heads


def test_weights_config_mismatch_lists_missing_unexpected_and_shapes():
    model = tiny_model("llama")
    info = arch_info(model.config)
    hf = hf_state_dict(model)
    hf.pop("model.layers.1.mlp.up_proj.weight")
    hf["model.layers.7.extra.weight"] = torch.zeros(1)
    hf["model.norm.weight"] = torch.zeros(65)
    with pytest.raises(ConversionError) as e:
        hf_to_mcore(hf, info, 384)
    msg = str(e.value)
    assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected tensors ['model.layers.7.extra.weight']" in msg
    assert "model.norm.weight: (65,) != expected (64,)" in msg
    with pytest.raises(ConversionError, match="smaller than the real vocab"):
        hf_to_mcore(hf_state_dict(model), info, 256)


def test_tied_checkpoint_with_a_different_lm_head_is_refused():
    model = tiny_model("qwen2_tied")
    hf = hf_state_dict(model)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
    hf_to_mcore(hf, arch_info(model.config), 384)  # an equal copy is fine
    hf["lm_head.weight"][0, 0] += 1
    with pytest.raises(ConversionError, match="tie_word_embeddings=true but lm_head.weight differs"):
        hf_to_mcore(hf, arch_info(model.config), 384)
    untied = replace(arch_info(model.config), tie_word_embeddings=False)
    hf.pop("lm_head.weight")
    with pytest.raises(ConversionError, match=r"missing tensors \['lm_head.weight'\]"):
        hf_to_mcore(hf, untied, 384)


def test_read_hf_checkpoint_sharded_index_and_missing_shard(tmp_path: Path):
    src = save_tiny("qwen3", tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    hf_io.copy_side_files(src, sharded)
    files = hf_io.write_safetensors(sorted(tensors.items()), sharded, max_shard_bytes=100_000)
    assert hf_io.SAFE_INDEX in files and len(files) > 2
    index = json.loads((sharded / hf_io.SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    _, info, got = hf_io.read_hf_checkpoint(sharded)
    assert info.head_dim == 32 and set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    umask = os.umask(0)
    os.umask(umask)  # weight files readable like the side files (safetensors alone writes 0600)
    assert {oct(stat.S_IMODE((sharded / f).stat().st_mode)) for f in files} == {oct(0o666 & ~umask)}
    (sharded / files[1]).unlink()
    with pytest.raises(ConversionError, match=f"missing shard file.*{files[1]}"):
        hf_io.read_hf_checkpoint(sharded)


def test_read_hf_checkpoint_checks_shapes_from_headers(tmp_path: Path):
    src = save_tiny("llama", tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # MHA-shaped k in a GQA config
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"k_proj.weight: \(64, 64\) != expected \(32, 64\)"):
        hf_io.read_hf_checkpoint(src)
    (src / "config.json").write_text("{\n  bad")
    with pytest.raises(ConversionError, match="config.json: invalid JSON at line 2"):
        hf_io.read_hf_checkpoint(src)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with hf_io.atomic_output_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with hf_io.atomic_output_dir(target) as tmp:
        (tmp / "done.bin").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["done.bin"]
    with pytest.raises(ConversionError, match="already exists"):
        hf_io.check_output_dir(target)


def test_top_level_cli_dispatch_reports_bad_input(tmp_path: Path, capsys):
    from megatron_scpo.cli import main

    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope/config.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_converted_checkpoint_meta_is_hfarch_and_v1_still_compares():
    """scpo_convert.json's "arch" is HFArch (v2); a v1 meta (the converter's old renamed subset) is compared on the
    fields it shares, the renamed ones being left to the tensor shape checks."""
    from dataclasses import asdict

    from megatron_scpo.convert.checkpoint import _compare_arch

    info = arch_info(tiny_config("qwen3").to_dict())
    _compare_arch(asdict(info), info, "m")
    v1 = {"model_type": "qwen3", "num_layers": info.num_layers, "hidden": 1, "num_heads": info.num_heads,
          "num_kv_heads": info.num_kv_heads, "head_dim": info.head_dim, "ffn": 1, "vocab": 1, "tied": True,
          "qkv_bias": False, "qk_norm": True}
    _compare_arch(v1, info, "m")
    with pytest.raises(ConversionError, match=r"m: config does not match .*head_dim: checkpoint 7 vs config 32"):
        _compare_arch({**v1, "head_dim": 7}, info, "m")
    with pytest.raises(ConversionError, match=r"rope_theta: checkpoint 1\.0"):
        _compare_arch({**asdict(info), "rope_theta": 1.0}, info, "m")
