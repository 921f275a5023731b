"""Conversion on real megatron-core over 2 gloo ranks: logits parity with HF at TP=1 (x DP=2), TP=2 and PP=2,
bitwise streaming export, and the `scpo convert` round trip with resharding (written at TP=2 or PP=2, read at
TP=1 or TP=2). One 2-process launch does all of it (process start-up + `import megatron` dominates); the
checkpoints it leaves behind feed the bad-input tests, which run in this process without megatron state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from convert_tiny import ARCHS, VOCAB, hf_state_dict, tiny_model
from dist_utils import spawn
from safetensors.torch import load_file

from megatron_scpo.convert.mapping import ConversionError

LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (tp, pp); DP = 2 / (tp*pp)
# arch -> (hf-to-mcore layout, mcore-to-hf layout): every conversion reshards
CONVERT = {"qwen2_tied": ((2, 1), (1, 1)), "qwen3": ((2, 1), (1, 2)), "llama": ((1, 2), (2, 1))}


def _megatron_logits(chunks, ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, padded_vocab] on the last stage (None elsewhere); manual 2-stage pipeline."""
    from megatron.core import parallel_state as ps

    (m,) = chunks
    m.eval()
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    with torch.no_grad():
        if pp > 1 and stage > 0:
            h = torch.empty(s, b, m.config.hidden_size)
            dist.recv(h, src=ranks[stage - 1])
            m.set_input_tensor(h)
        out = m(ids, pos, None)
        if pp > 1 and stage < pp - 1:
            dist.send(out.contiguous(), dst=ranks[stage + 1])
            return None
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _worker(rank: int, world_size: int, root: str) -> None:
    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.model import build_model
    from megatron_scpo.backend.parallel import init_parallel
    from megatron_scpo.convert.cli import main
    from megatron_scpo.convert.live import iter_hf_tensors, load_hf_into_model

    root_p = Path(root)
    report: dict[str, float] = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        cfg, ref_sd = model.config, hf_state_dict(model)
        hf_dir = root_p / arch / "hf"
        if rank == 0:
            model.save_pretrained(str(hf_dir))
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = model(ids).logits
        for tp, pp in LAYOUTS:
            init_parallel(tp, pp)
            chunks = build_model(cfg, ParallelConfig(tp=tp, pp=pp))
            load_hf_into_model(chunks, cfg, ref_sd)
            logits = _megatron_logits(chunks, ids)
            if logits is not None:
                assert logits.shape[-1] % (128 * tp) == 0
                diff = (logits[..., :VOCAB] - ref).abs().max().item()
                report[f"{arch}/tp{tp}pp{pp}/logits"] = diff
                assert diff < 1e-5, f"{arch} tp={tp} pp={pp}: max |logit diff| {diff}"
            exported = list(iter_hf_tensors(chunks, cfg))  # every rank gets every tensor
            names = [n for n, _ in exported]
            assert sorted(names) == sorted(ref_sd) and len(names) == len(set(names)), (arch, tp, pp)
            for n, t in exported:
                assert torch.equal(t, ref_sd[n]), f"{arch} tp={tp} pp={pp}: export of {n} differs"
        dist.barrier()
        (wtp, wpp), (rtp, rpp) = CONVERT[arch]
        mc, out = root_p / arch / "mcore", root_p / arch / "hf_out"
        assert main(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(mc), "--tp", str(wtp), "--pp", str(wpp)]) == 0
        assert main(["mcore-to-hf", "--mcore", str(mc), "--out", str(out), "--tp", str(rtp), "--pp", str(rpp)]) == 0
        if rank == 0:
            a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
            assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
            for k in a:
                assert torch.equal(a[k], b[k]), f"{arch}: round trip changed {k}"
            assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    reports: list = [None] * world_size
    dist.all_gather_object(reports, report)  # PP=2 logits live on the last stage (rank 1)
    if rank == 0:
        merged = {k: v for r in reports for k, v in r.items()}
        (root_p / "report.json").write_text(json.dumps(merged, indent=1))


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("convert_dist")
    spawn(_worker, 2, (str(root),))
    return root


@pytest.mark.distributed
def test_logits_parity_and_round_trip_on_two_ranks(dist_run: Path):
    report = json.loads((dist_run / "report.json").read_text())
    assert len(report) == len(ARCHS) * len(LAYOUTS)
    print("max |megatron - HF| logits:", json.dumps(report))
    for arch in ARCHS:
        meta = json.loads((dist_run / arch / "mcore" / "scpo_convert.json").read_text())
        assert (meta["saved_tp"], meta["saved_pp"]) == CONVERT[arch][0]
        assert (dist_run / arch / "mcore" / "hf" / "config.json").is_file()
        # only the final directories, no temp leftovers
        assert sorted(p.name for p in (dist_run / arch).iterdir()) == ["hf", "hf_out", "mcore"]


@pytest.mark.distributed
def test_bad_inputs_fail_before_work_and_leave_no_output(dist_run: Path, tmp_path: Path, capsys):
    from megatron_scpo.convert import checkpoint
    from megatron_scpo.convert.cli import main

    mc = dist_run / "qwen3" / "mcore"
    out = tmp_path / "out"
    # a shard file of the dist checkpoint is gone
    broken = tmp_path / "broken"
    shutil.copytree(mc, broken)
    shard = sorted(broken.glob("*.distcp"))[0]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"missing checkpoint shard file.*{shard.name}"):
        checkpoint.mcore_to_hf(broken, out)
    # another model's config passed with --hf-config
    with pytest.raises(ConversionError, match="does not match the checkpoint's architecture.*head_dim"):
        checkpoint.mcore_to_hf(mc, out, hf_config_dir=dist_run / "llama" / "hf")
    # not a checkpoint at all
    with pytest.raises(ConversionError, match="not a megatron dist checkpoint"):
        checkpoint.mcore_to_hf(dist_run / "qwen3" / "hf", out, hf_config_dir=dist_run / "qwen3" / "hf")
    # TP does not divide the heads (4 heads, tp=3): reported as such, in a single process
    assert main(["hf-to-mcore", "--hf", str(dist_run / "llama" / "hf"), "--out", str(out), "--tp", "3"]) == 2
    assert "tp=3 does not divide num_attention_heads=4" in capsys.readouterr().err
    # unsupported architecture
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(dist_run / "llama" / "hf", gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert main(["hf-to-mcore", "--hf", str(gpt2), "--out", str(out)]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    # existing non-empty output is refused
    assert main(["mcore-to-hf", "--mcore", str(mc), "--out", str(dist_run / "qwen3" / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not out.exists()
    assert not any(p.name.endswith(".scpo-partial") for p in tmp_path.iterdir())


@pytest.mark.distributed
def test_single_process_cli_round_trip(dist_run: Path, tmp_path: Path):
    """`scpo convert` as a user runs it: one plain process (private 1-rank gloo group), no torchrun env."""
    import os
    import subprocess
    import sys

    src = dist_run / "qwen2_tied" / "hf"
    code = (
        "import sys; from megatron_scpo.cli import main; "
        f"sys.exit(main(['convert', 'hf-to-mcore', '--hf', {str(src)!r}, '--out', {str(tmp_path / 'mc')!r}]) or "
        f"main(['convert', 'mcore-to-hf', '--mcore', {str(tmp_path / 'mc')!r}, '--out', {str(tmp_path / 'hf')!r}]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(p.name for p in src.iterdir())
