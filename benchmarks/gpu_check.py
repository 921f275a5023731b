"""GPU check: everything a lent GPU machine should measure, in one run of a few minutes, no network.

    bash benchmarks/gpu_check.sh [OUT_DIR] [--quick]          # installs carried wheels, then runs this
    python benchmarks/gpu_check.py --out DIR [--quick] [--sections kernels,megatron] [--budget-s 450]

Sections (each in its own subprocess with a timeout, so one failure or hang never loses the others):

- ``env``: python / torch / CUDA / GPU / triton / transformers / megatron-core / TE / math-verify versions, and
  what ``gpu_check.sh`` installed from the carried wheel dir.
- ``kernels``: the Triton kernels (``scpo_kernels``) vs the torch paths and float64 references
  (tests/kernels/kernels_refs.py), on CUDA tensors with compiled kernels: fused log-probs (fp32, bf16,
  V = 151,936, forward + backward, entropy), S-GAE (token, critic, step ids, packed), policy loss (every
  aggregation, dual clip, TIS). ``scpo_kernels.LAUNCHES`` proves the Triton path ran. Then the log-prob kernel's
  achieved bandwidth (``triton.testing.do_bench``) as a fraction of HBM peak (``--hbm-tbps``, default from the
  GPU name, H200: 4.8 TB/s): forward reads the logits once; forward + backward reads them twice and writes the
  gradient (3 passes), so bytes = passes x N x V x element size (a lower bound of the traffic).
- ``bench``: ``pytest -m bench`` (benchmarks/bench_kernels.py, one subprocess per case) with
  ``SCPO_TEST_CUDA=1``; its JSON rows plus the HBM fraction of every log-prob row.
- ``megatron``: ``MegatronPolicy`` forward (log-probs) and forward + backward + Adam (SFT loss) on CUDA, bf16,
  with the Transformer Engine layer spec when ``transformer_engine`` imports (else megatron's local spec, and
  the import error is the reason); log-probs vs the HF transformers model with the same weights; tokens/s,
  model TFLOP/s (6 x params x tokens per train step), peak memory.
- ``rl_step``: one RL step (rollout with the LocalEngine, log-probs, S-GAE, SCPO loss, weight sync) of the
  trainer on the tiny model, packed when the config offers packing; time per phase.

Without CUDA (CPU mode) every section still runs its code at tiny sizes so the script is known to work before a
GPU is lent: kernels in the Triton interpreter on CPU tensors, Megatron with the local spec on gloo, the RL step
on CPU. Their status is ``cpu-smoke``; CUDA-only measurements (bandwidth, the bench, TE) are ``skipped`` with
the reason. ``--quick`` shrinks every size (the test in tests/kernels/test_gpu_check.py uses it).

Output: ``gpu_check.json`` (every section's status, reason, results, seconds) and ``gpu_check.md`` (the same as
tables) in ``--out`` (default ``$OUT`` or ``./gpu_check_out``). Exit code 0 unless a section failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "kernels", "megatron", "rl_step", "bench"]  # the longest (bench) last: it gets what is left
# Seconds per section on a GPU (the whole run must stay under 8 minutes with the start-up around it).
TIMEOUTS = {"env": 60, "kernels": 120, "megatron": 120, "rl_step": 120, "bench": 240}
HBM_TBPS = {"H200": 4.8, "H100": 3.35, "H800": 3.35, "A100": 2.0, "B200": 8.0, "L40S": 0.864, "A10": 0.6}
def _tiny_rl() -> list[str]:
    """The trainer tests' tiny RL config (tests/trainer/trainer_tiny.py, one home) with one mini-batch, quiet."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "trainer")]
    from trainer_tiny import TINY_RL as test_tiny_rl

    return [*test_tiny_rl, "rl.mini_batches=1", "logging.stdout=false"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _version(mod: str) -> str | None:
    """The installed version of module ``mod`` (distribution metadata first), or why it does not import."""
    import importlib.metadata

    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001 (any import failure is the answer)
        return f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    dist = {"megatron.core": "megatron-core", "transformer_engine": "transformer-engine",
            "math_verify": "math-verify"}.get(mod, mod)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules[mod], "__version__", "unknown"))


def hbm_tbps(name: str, override: float | None) -> float | None:
    """Peak HBM bandwidth (TB/s) of the GPU named ``name`` (``--hbm-tbps`` wins); None when unknown."""
    if override:
        return override
    return next((v for k, v in HBM_TBPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------------ env
def sec_env(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "triton": _version("triton"), "transformers": _version("transformers"),
        "megatron_core": _version("megatron.core"), "transformer_engine": _version("transformer_engine"),
        "math_verify": _version("math_verify"), "host": platform.node(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   hbm_tbps=hbm_tbps(p.name, args.hbm_tbps))
    log = os.environ.get("SCPO_GPU_CHECK_WHEELS_LOG")
    if log and Path(log).is_file():
        res["wheels"] = Path(log).read_text().strip().splitlines()[-12:]
    return {"status": "ok", "results": res}


# ------------------------------------------------------------------------------------------------ kernels
def _max_err(got: Any, ref: Any, rel: bool) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    err = float((got - ref).abs().max())
    return err / max(float(ref.abs().max()), 1e-12) if rel else err


def _check_logprobs(dev: str, cases: list[tuple[int, int, str]], impls: list[str]) -> list[dict[str, Any]]:
    import torch
    from kernels_refs import logprobs_ref
    from scpo_kernels import fused_logprobs

    out = []
    for n, v, dt in cases:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        g = torch.Generator().manual_seed(n + v)
        x0 = (torch.randn(n, v, generator=g) * 4).to(dtype)
        t = torch.randint(0, v, (n,), generator=g)
        t[min(1, n - 1)] = -100
        g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
        xr = x0.double().requires_grad_()
        lr, er = logprobs_ref(xr, t, 0.8)
        (lr * g_lp.double() + er * g_ent.double()).sum().backward()
        for impl in impls:
            x = x0.clone().to(dev).requires_grad_()  # a fresh leaf per impl (on CPU .to() would alias x0)
            lp, ent = fused_logprobs(x, t.to(dev), temperature=0.8, return_entropy=True, impl=impl)
            (lp * g_lp.to(dev) + ent * g_ent.to(dev)).sum().backward()
            e = {"logp": _max_err(lp, lr, False), "entropy": _max_err(ent, er, False),
                 "grad": _max_err(x.grad, xr.grad, dtype == torch.bfloat16)}
            # the kernel tests' bounds (vs float64), 2-5x looser for CUDA's approximate exp and V up to 151,936;
            # a real bug is >= 1e-3
            bound = {"logp": 2e-5, "entropy": 5e-5 if dt == "fp32" else 2e-4, "grad": 2e-5 if dt == "fp32" else 2e-2}
            out.append({"op": "fused_logprobs", "case": f"N={n} V={v} {dt}", "impl": impl, "max_err": e,
                        "bound": bound, "ok": all(e[k] <= bound[k] for k in e)})
    return out


def _check_gae(dev: str, b: int, t: int, impls: list[str]) -> list[dict[str, Any]]:
    import torch
    from kernels_refs import sgae_ref
    from scpo_kernels import segmented_gae

    g = torch.Generator().manual_seed(7)
    mask = torch.rand(b, t, generator=g) > 0.1
    mask[:, -t // 8:] = False
    r = torch.randn(b, t, generator=g)
    vals = torch.randn(b, t, generator=g)
    sids = torch.cumsum((torch.rand(b, t, generator=g) < 0.05).long(), 1)
    ends = torch.rand(b, t, generator=g) < 0.01
    variants = {
        "token": dict(gamma=0.99, lam=0.95),
        "token+critic": dict(values=vals, gamma=0.99, lam=0.95),
        "step ids": dict(step_ids=sids, gamma=1.0, lam=0.5),
        "packed step ids+critic": dict(step_ids=sids, seq_ends=ends, values=vals, gamma=0.99, lam=0.9),
    }
    out = []
    for name, kw in variants.items():
        ra, rr = sgae_ref(r.double(), mask, **{k: (v.double() if k == "values" else v) for k, v in kw.items()})
        for impl in impls:
            dkw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            a, ret = segmented_gae(r.to(dev), mask.to(dev), impl=impl, **dkw)
            e = max(_max_err(a, ra, False), _max_err(ret, rr, False))
            out.append({"op": "segmented_gae", "case": f"{name} B={b} T={t}", "impl": impl, "max_err": e,
                        "bound": 1e-4, "ok": e <= 1e-4})
    return out


def _check_policy_loss(dev: str, b: int, t: int, impls: list[str]) -> list[dict[str, Any]]:
    import torch
    from scpo_kernels import policy_loss

    g = torch.Generator().manual_seed(3)
    lp0 = torch.randn(b, t, generator=g) * 0.1 - 1
    old = lp0 + torch.randn(b, t, generator=g) * 0.2
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    eps_lo, eps_hi = torch.full((b,), 0.2), torch.full((b,), 0.28)
    tis = torch.rand(b, t, generator=g) + 0.5
    ref = lp0 + torch.randn(b, t, generator=g) * 0.2
    out = []
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        for extra in ({}, {"dual_clip": 3.0, "tis_weights": tis, "ref_logprobs": ref, "kl_coef": 0.1}):
            res = {}
            for impl in ["torch", *[i for i in impls if i != "torch"]]:
                lp = lp0.clone().to(dev).requires_grad_()
                kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
                loss, _ = policy_loss(lp, old.to(dev), adv.to(dev), mask.to(dev), eps_lo.to(dev), eps_hi.to(dev),
                                      agg=agg, impl=impl, **kw)
                loss.backward()
                res[impl] = (loss.detach(), lp.grad)
            for impl in impls:
                if impl == "torch":
                    continue
                e = max(_max_err(res[impl][0], res["torch"][0], False), _max_err(res[impl][1], res["torch"][1], False))
                out.append({"op": "policy_loss", "case": f"{agg}{' dual+TIS+KL' if extra else ''} B={b} T={t}",
                            "impl": f"{impl} vs torch", "max_err": e, "bound": 1e-6, "ok": e <= 1e-6})
    return out


def _logprob_bandwidth(n: int, v: int, tbps: float | None) -> list[dict[str, Any]]:
    """Achieved bandwidth of the Triton log-prob kernel, forward and forward + backward, bf16."""
    import torch
    import triton.testing
    from scpo_kernels import fused_logprobs

    x = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    elem = x.element_size()

    def fwd() -> None:
        with torch.no_grad():
            fused_logprobs(x, t, impl="triton")

    def fwd_bwd() -> None:
        x.grad = None
        lp, _ = fused_logprobs(x, t, impl="triton")
        lp.sum().backward()

    rows = []
    for label, fn, passes in (("forward", fwd, 1), ("forward+backward", fwd_bwd, 3)):
        fn()
        ms = triton.testing.do_bench(fn, warmup=5, rep=60)
        gbps = passes * n * v * elem / (ms / 1e3) / 1e9
        rows.append({"case": f"fused_logprobs {label} N={n} V={v} bf16", "ms": ms, "bytes_passes": passes,
                     "achieved_GBps": gbps, "hbm_fraction": gbps / (tbps * 1e3) if tbps else None})
    return rows


def sec_kernels(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "kernels"))
    import scpo_kernels
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not scpo_kernels.HAS_TRITON:
        return {"status": "skipped", "reason": "triton is not importable: only the torch paths exist here"}
    impls = ["torch", "triton"]
    if cuda and not args.quick:
        lp_cases = [(4, 1000, "fp32"), (7, 3001, "fp32"), (257, 32000, "fp32"), (64, 151936, "bf16"),
                    (1024, 151936, "bf16")]
        b, t = 8, 1024
    elif cuda:
        lp_cases, b, t = [(7, 3001, "fp32"), (64, 151936, "bf16")], 4, 512
    else:  # the interpreter: tiny shapes only
        lp_cases, b, t = [(4, 1000, "fp32"), (3, 2003, "bf16")], 2, 64
    before = dict(scpo_kernels.LAUNCHES)
    rows = _check_logprobs(dev, lp_cases, impls) + _check_gae(dev, b, t, impls) + _check_policy_loss(dev, b, t, impls)
    launches = {k: v - before.get(k, 0) for k, v in scpo_kernels.LAUNCHES.items() if v - before.get(k, 0)}
    res: dict[str, Any] = {"device": dev, "interpreter": bool(scpo_kernels.INTERPRET), "checks": rows,
                           "triton_launches": launches}
    failed = [f"{r['op']} {r['case']} {r['impl']}" for r in rows if not r["ok"]]
    if not launches:
        failed.append("no Triton launch was counted: the Triton path did not run")
    if cuda:
        name = torch.cuda.get_device_properties(0).name
        n = 2048 if args.quick else 8192
        res["bandwidth"] = _logprob_bandwidth(n, 151936, hbm_tbps(name, args.hbm_tbps))
        res["hbm_tbps"] = hbm_tbps(name, args.hbm_tbps)
    else:
        res["bandwidth"] = "skipped: no CUDA (bandwidth is a GPU measurement)"
    status = "failed" if failed else ("ok" if cuda else "cpu-smoke")
    return {"status": status, "reason": "; ".join(failed) or (None if cuda else
            "no CUDA: Triton kernels ran in the interpreter on CPU tensors at tiny shapes"), "results": res}


# ------------------------------------------------------------------------------------------------ bench
def sec_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA: the bench's CPU numbers are in docs/kernels.md "
                "(python benchmarks/bench_kernels.py); this section measures the Triton paths on the GPU"}
    out_json = Path(args.workdir) / "bench.json"
    env = {**os.environ, "SCPO_TEST_CUDA": "1", "SCPO_BENCH_JSON": str(out_json)}
    if args.quick:
        env["SCPO_BENCH_ARGS"] = "--quick"
    env.pop("TRITON_INTERPRET", None)
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("pytest", "hypothesis")):
        cmd = [sys.executable, "-m", "pytest", "-m", "bench", "-q", "-s", "-p", "no:cacheprovider",
               str(REPO / "tests" / "kernels" / "test_kernels_bench.py")]
        how = "pytest -m bench"
    else:  # the same cases without pytest (no pytest/hypothesis wheel carried)
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--json", str(out_json),
               *(["--quick"] if args.quick else [])]
        how = "benchmarks/bench_kernels.py (pytest or hypothesis not installed)"
    # leave the section's own timeout room to report: rows already printed survive a bench timeout
    rc, out, timed_out = run_group(cmd, max(30.0, args.section_timeout - 25), env=env)
    table = list(dict.fromkeys(ln for ln in out.splitlines() if ln.startswith("|") or ln.startswith("device:")))
    res: dict[str, Any] = {"ran": how, "rc": rc, "table": table}
    name = torch.cuda.get_device_properties(0).name
    res["logprob_hbm"] = logprob_hbm_rows(table, hbm_tbps(name, args.hbm_tbps))
    if out_json.is_file():
        res["rows"] = json.loads(out_json.read_text())
    if timed_out:
        return {"status": "failed", "reason": f"bench timed out after {args.section_timeout - 25:.0f} s; the rows "
                "measured before are kept", "results": res}
    if rc != 0:
        return {"status": "failed", "reason": out.strip().splitlines()[-1:], "results": res}
    return {"status": "ok", "results": res}


def logprob_hbm_rows(table: list[str], tbps: float | None) -> list[dict[str, Any]]:
    """GB/s and HBM fraction of the bench's log-prob rows ("| log-probs ... N=.. V=.. bf16 | naive | ours | ...").

    Bytes = 3 passes over the [N, V] logits (forward read, backward re-read, gradient write): a lower bound.
    """
    import re

    out = []
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        m = re.search(r"N=(\d+) V=(\d+) (fp32|bf16)", cells[0]) if cells else None
        if not (m and cells[0].startswith("log-probs") and len(cells) > 2 and cells[2].endswith(" ms")):
            continue
        n, v, dt = int(m.group(1)), int(m.group(2)), m.group(3)
        sec = float(cells[2].removesuffix(" ms")) / 1e3
        gbps = 3 * n * v * (2 if dt == "bf16" else 4) / sec / 1e9
        out.append({"label": cells[0], "achieved_GBps": gbps, "hbm_fraction": gbps / (tbps * 1e3) if tbps else None})
    return out


def run_group(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
              stdout: Any = None) -> tuple[int, str, bool]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (pytest's bench subprocesses too).

    Returns (exit code, captured stdout+stderr or "" when ``stdout`` is a file, timed out?).
    """
    import signal

    p = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, start_new_session=True,
                         stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out or "", False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return -9, out or "", True


# ------------------------------------------------------------------------------------------------ megatron
def _uses_te(model: Any) -> bool:
    return any(type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
               for m in model.modules())


def sec_megatron(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "reason": f"megatron-core not importable ({e}); carry its wheel in "
                "shared/wheels or benchmarks/wheels (benchmarks/gpu_check.sh installs it)"}
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_scpo.backend.config import ParallelConfig
    from megatron_scpo.backend.policy import MegatronPolicy
    from megatron_scpo.backend.seam import TrainBatch
    from megatron_scpo.trainer.config import OptimConfig
    from megatron_scpo.trainer.loss import SFTLoss

    cuda = torch.cuda.is_available()
    te = _version("transformer_engine")
    te_ok = cuda and te is not None and not te.startswith("not importable")
    if cuda and not args.quick:  # ~0.5B parameters, Qwen3 layout (q/k norm, head_dim 128, GQA), vocab of Qwen
        dims = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936)
        bsz, seq, dtype, steps = 8, 2048, "bfloat16", 3
    elif cuda:
        dims = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, vocab_size=32000)
        bsz, seq, dtype, steps = 4, 512, "bfloat16", 2
    else:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, vocab_size=300)
        bsz, seq, dtype, steps = 2, 32, "float32", 1
    # initializer_range 0.05: logits spread by ~1 nat, so a layout bug shows as an O(1) log-prob error (at 0.02 a
    # random model is nearly uniform over the vocab and a wrong model would look right)
    cfg = Qwen3Config(**dims, max_position_embeddings=max(4096, seq), rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, initializer_range=0.05)
    cfg._attn_implementation = "sdpa" if cuda else "eager"
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    policy = MegatronPolicy(cfg, ParallelConfig(tp=1, pp=1, use_distributed_optimizer=False),
                            OptimConfig(lr=1e-5, weight_decay=0.0), dtype=dtype, micro_batch_size=bsz)
    policy.load_hf_weights({k: v.detach() for k, v in hf.state_dict().items()})
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, dims["vocab_size"], (bsz, seq), generator=g).to(dev)
    am = torch.ones_like(ids)
    res: dict[str, Any] = {"device": dev, "dtype": dtype, "params": n_params, "batch": [bsz, seq],
                           "layer_spec": "transformer_engine" if _uses_te(policy.modules()[0]) else "local",
                           "te_importable": te_ok, "te": te}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    lp = policy.compute_logprobs(ids, am)  # warm-up + the parity check
    with torch.no_grad():  # HF reference in fp32 (on the GPU when there is one)
        hf = hf.to(dev).float()
        logits = hf(input_ids=ids).logits.float()
        ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        del logits
    hf.cpu()
    err = float((lp[:, 1:].float().to(dev) - ref).abs().max())
    bound = 1e-4 if dtype == "float32" else 5e-2
    res["logprob_vs_hf"] = {"max_abs_err": err, "bound": bound}

    def timed(fn: Callable[[], Any], n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    tokens = bsz * seq
    t_fwd = timed(lambda: policy.compute_logprobs(ids, am), steps)
    loss_mask = am.clone()
    loss_mask[:, 0] = 0  # the first token has no log-prob
    batch = TrainBatch(input_ids=ids, attention_mask=am, loss_mask=loss_mask)
    policy.train_step(batch, SFTLoss())  # warm-up (optimizer state)
    t_step = timed(lambda: policy.train_step(batch, SFTLoss()), steps)
    res.update(forward_s=t_fwd, forward_tokens_per_s=tokens / t_fwd, train_step_s=t_step,
               train_tokens_per_s=tokens / t_step, train_model_tflops=6 * n_params * tokens / t_step / 1e12)
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    failed = err > bound or not math.isfinite(err)
    reason = None
    if failed:
        reason = f"log-probs differ from HF by {err:.3g} > {bound}"
    elif not cuda:
        reason = "no CUDA: local spec on CPU/gloo at tiny size (TE and CUDA timings need a GPU)"
    elif res["layer_spec"] == "local":
        reason = f"Transformer Engine not used: {te}" if not te_ok else "TE importable but the local spec was built"
    return {"status": "failed" if failed else ("ok" if cuda else "cpu-smoke"), "reason": reason, "results": res}


# ------------------------------------------------------------------------------------------------ rl step
def sec_rl_step(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        return {"status": "skipped", "reason": f"megatron-core not importable ({e})"}
    import dataclasses

    import torch

    from megatron_scpo.config import load_config
    from megatron_scpo.data.datasets import PromptIterator, load_split
    from megatron_scpo.trainer.rl import rl_step
    from megatron_scpo.trainer.run import build_runtime, method_for, quiet_warnings

    quiet_warnings()
    # A random tiny model answers everything wrong: all-wrong groups get zero advantages, so loss and gradient are
    # 0, but the step does all its work (rollout, log-prob and importance passes, forward + backward, Adam, sync).
    cfg = load_config(None, [*_tiny_rl(), "name=gpu_check", "algo.method=scpo"])
    packed = []  # packing options (issue 12 item 1) when this checkout has them
    for sec_name in ("rl", "parallel"):
        sec = getattr(cfg, sec_name)
        for f in dataclasses.fields(sec):
            if "pack" in f.name and isinstance(getattr(sec, f.name), bool):
                sec = dataclasses.replace(sec, **{f.name: True})
                packed.append(f"{sec_name}.{f.name}")
        cfg = dataclasses.replace(cfg, **{sec_name: sec})
    rt = build_runtime(cfg, Path(args.workdir) / "rl_run")
    records = PromptIterator(load_split(cfg.data, "train"), seed=0).next_batch(cfg.rl.prompts_per_step)
    method = method_for(cfg, "scpo")
    steps: list[dict[str, Any]] = []
    for step in range(1 if args.quick else 2):
        t0 = time.perf_counter()
        # The trainer hands host (CPU) batches to the policy; the backend moves them to the model's device
        # (MegatronPolicy.device) and returns log-probs on the host. A device error here is a backend bug.
        m = rl_step(rt, method, records, step=step, seed=11 + step)
        steps.append({"seconds": time.perf_counter() - t0,
                      **{k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and (
                          k.startswith("time/") or k in ("loss", "reward/mean", "length/mean", "grad_norm",
                                                         "rollout_logprob_abs_diff"))}})
    if rt.engine is not None:
        rt.engine.shutdown()
    res = {"device": "cuda" if torch.cuda.is_available() else "cpu", "packed": packed or "no packing option "
           "in this checkout (issue 12 item 1 pending): padded path", "steps": steps}
    diff = steps[-1].get("rollout_logprob_abs_diff", 0.0)
    if not math.isfinite(steps[-1].get("loss", float("nan"))) or diff > 1e-2:
        return {"status": "failed", "reason": f"loss {steps[-1].get('loss')} / engine-trainer diff {diff}",
                "results": res}
    cuda = torch.cuda.is_available()
    return {"status": "ok" if cuda else "cpu-smoke", "results": res,
            "reason": None if cuda else "no CUDA: the trainer's CPU path (same code, gloo)"}


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": sec_env, "kernels": sec_kernels, "bench": sec_bench, "megatron": sec_megatron, "rl_step": sec_rl_step,
}


# ------------------------------------------------------------------------------------------------ driver
def run_section_here(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = RUNNERS[name](args)
    except Exception as e:  # noqa: BLE001 (reported, never raised: the other sections still run)
        out = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc().splitlines()[-25:]}
    out["seconds"] = time.perf_counter() - t0
    return out


def run_section_subprocess(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """The section in a fresh interpreter (kernel sections need TRITON_INTERPRET decided before import)."""
    result = Path(args.workdir) / f"section_{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    if name == "kernels":
        if _cuda():
            env.pop("TRITON_INTERPRET", None)
        else:
            env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-section", name, "--result", str(result),
           "--workdir", args.workdir, *(["--quick"] if args.quick else []),
           *(["--hbm-tbps", str(args.hbm_tbps)] if args.hbm_tbps else [])]
    cmd += ["--section-timeout", str(timeout)]
    log = Path(args.workdir) / f"section_{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        _, _, timed_out = run_group(cmd, timeout, env=env, stdout=f)
    if timed_out:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s (log: {log.name})",
                "seconds": time.perf_counter() - t0}
    if not result.is_file():
        tail = log.read_text().strip().splitlines()[-5:]
        return {"status": "failed", "reason": f"no result (crashed): {tail}", "seconds": time.perf_counter() - t0}
    return json.loads(result.read_text())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return "".join(f"<br>{_fmt(x)}" for x in v)
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a status table, then each section's main numbers."""
    lines = [f"# GPU check ({report['mode']})", "", f"started {report['started']}, {report['total_s']:.0f} s total", "",
             "| section | status | seconds | reason |", "|---|---|---|---|"]
    for name, s in report["sections"].items():
        reason = s.get("reason") or ""
        reason = "; ".join(reason) if isinstance(reason, list) else reason
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {reason} |")
    env = report["sections"].get("env", {}).get("results", {})
    if env:
        lines += ["", "## Environment", "", *[f"- {k}: {_fmt(v)}" for k, v in env.items() if k != "wheels"]]
    k = report["sections"].get("kernels", {}).get("results", {})
    if k:
        lines += ["", f"## Kernels vs references ({k.get('device')}, interpreter={k.get('interpreter')})", "",
                  "| op | case | impl | max err | bound | ok |", "|---|---|---|---|---|---|"]
        for r in k.get("checks", []):
            lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | {_fmt(r['max_err'])} | {_fmt(r['bound'])} | "
                         f"{r['ok']} |")
        lines += ["", f"Triton launches: {k.get('triton_launches')}"]
        bw = k.get("bandwidth")
        if isinstance(bw, list):
            lines += ["", "| log-prob kernel | ms | GB/s | fraction of HBM peak |", "|---|---|---|---|"]
            lines += [f"| {r['case']} | {r['ms']:.3f} | {r['achieved_GBps']:.0f} | {_fmt(r['hbm_fraction'])} |"
                      for r in bw]
        elif bw:
            lines += ["", f"Bandwidth: {bw}"]
    b = report["sections"].get("bench", {}).get("results", {})
    if b.get("table"):
        lines += ["", "## pytest -m bench (CUDA)", "", *b["table"]]
        if b.get("logprob_hbm"):
            lines += ["", "| log-prob bench row | GB/s (3 passes) | fraction of HBM peak |", "|---|---|---|"]
            lines += [f"| {r['label']} | {r['achieved_GBps']:.0f} | {_fmt(r['hbm_fraction'])} |" for r in b["logprob_hbm"]]
    for name in ("megatron", "rl_step"):
        r = report["sections"].get(name, {}).get("results")
        if r:
            lines += ["", f"## {name}", "", *[f"- {k2}: {_fmt(v)}" for k2, v in r.items()]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="result dir (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere (CPU test, first GPU smoke)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all sections")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="peak HBM TB/s (default: from the GPU name)")
    ap.add_argument("--run-section", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--section-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_section:  # child: one section, result as JSON
        Path(args.result).write_text(json.dumps(run_section_here(args.run_section, args), default=str))
        return 0
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    args.workdir = str((out / "work").resolve())
    Path(args.workdir).mkdir(exist_ok=True)
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in RUNNERS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    t_start = time.time()
    report: dict[str, Any] = {"mode": ("cuda" if _cuda() else "cpu") + (" quick" if args.quick else ""),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sections": {}}
    for name in names:
        left = args.budget_s - (time.time() - t_start)
        if left < 10:
            report["sections"][name] = {"status": "skipped", "reason": "time budget spent", "seconds": 0.0}
            continue
        res = run_section_subprocess(name, args, min(TIMEOUTS[name] * (1 if _cuda() else 2), left))
        report["sections"][name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res.get('seconds', 0):.1f} s)"
              f"{' - ' + str(res['reason']) if res.get('reason') else ''}", flush=True)
    report["total_s"] = time.time() - t_start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    return 1 if any(s["status"] == "failed" for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
