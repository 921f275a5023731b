"""Kernel benchmarks: naive vs ours, time and peak extra memory, one case per subprocess.

    python benchmarks/bench_kernels.py                 # every case, prints a markdown table
    python benchmarks/bench_kernels.py --quick         # skip the N=8192 x V=151936 cases
    python benchmarks/bench_kernels.py --only gae      # only the cases whose label contains "gae"
    python benchmarks/bench_kernels.py --case logprobs:naive:8192:151936:bf16   # one case, prints JSON

On CUDA the "ours" rows run the Triton kernels (timed with ``triton.testing.do_bench``, memory from
``torch.cuda.max_memory_allocated``). On CPU they run the torch paths; memory is the process's
high-water RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS once the inputs exist, and
time is wall-clock of a single fwd+bwd (the big cases run once: shared 2-core machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

GIB = 1 << 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(fn: Callable[[], None], device: str, repeats: int, reset: Callable[[], None] | None = None
            ) -> tuple[float, int]:
    """(seconds per call, peak bytes above the state before the call) of ``fn``; ``reset`` runs untimed before."""
    reset = reset or (lambda: None)
    reset()
    gc.collect()
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(lambda: (reset(), fn()), warmup=5, rep=50)
        return ms / 1e3, peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - base) * 1024
    times = [first]
    for _ in range(repeats - 1):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), peak


# ---------------------------------------------------------------------------------------------------
# cases: each returns a closure running fwd+bwd on inputs built beforehand
# ---------------------------------------------------------------------------------------------------
def _logprobs_case(impl: str, n: int, v: int, dtype: torch.dtype, device: str):
    from scpo_kernels import fused_logprobs

    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, v, device=device, generator=g, dtype=torch.float32) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)
    inplace = impl == "ours_inplace"
    x0 = x.detach().clone() if inplace else None

    def run() -> None:
        if impl == "naive":
            lp = torch.log_softmax(x.float(), -1).gather(1, t[:, None]).squeeze(1)
        else:
            lp, _ = fused_logprobs(x, t, inplace_backward=inplace)
        lp.sum().backward()

    def reset() -> None:
        x.grad = None
        if inplace:  # the gradient overwrote the logits: restore them, untimed
            with torch.no_grad():
                x.copy_(x0)

    return run, reset


def _linear_case(impl: str, n: int, v: int, h: int, dtype: torch.dtype, device: str):
    from scpo_kernels import linear_logprobs

    g = torch.Generator(device=device).manual_seed(0)
    hid = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=device, generator=g) * h**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)

    def run() -> None:
        if impl == "naive":
            lp = torch.log_softmax((hid @ w.T).float(), -1).gather(1, t[:, None]).squeeze(1)
        else:
            lp, _ = linear_logprobs(hid, w, t)
        lp.sum().backward()

    def reset() -> None:
        hid.grad = w.grad = None

    return run, reset


def _gae_case(impl: str, b: int, t: int, mode: str, device: str):
    from scpo_kernels import segmented_gae

    if mode not in ("sgae", "sgae_holes", "token", "token_holes"):
        raise ValueError(f"unknown GAE mode {mode!r}")
    sgae = mode.startswith("sgae")
    g = torch.Generator(device=device).manual_seed(0)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[:, -t // 8 :] = False  # some right padding
    if mode.endswith("_holes"):  # masked tokens inside responses (as with tool output in multi-turn rollouts)
        mask &= torch.rand(b, t, device=device, generator=g) > 0.1
    v = torch.randn(b, t, device=device, generator=g) * mask
    step_ids = torch.cumsum((torch.rand(b, t, device=device, generator=g) < 0.02).long(), 1)
    if sgae:  # step rewards sit on each step's last token (the documented convention)
        is_end = torch.ones_like(mask)
        is_end[:, :-1] = step_ids[:, 1:] != step_ids[:, :-1]
        r = torch.randn(b, t, device=device, generator=g) * is_end * mask
        gamma, lam = 1.0, 0.5
    else:
        r = torch.randn(b, t, device=device, generator=g) * mask
        gamma, lam = 0.99, 0.95

    def loop() -> torch.Tensor:
        """The baseline: a per-timestep Python loop over T, vectorized over B, as usually written.

        Token GAE is verl's ``compute_gae_advantage_return`` loop (masked tokens carry the next value
        and the running advantage through); S-GAE is the same loop advancing the discount only where
        the step id changes.
        """
        adv = torch.zeros(b, t, device=device)
        acc = torch.zeros(b, device=device)
        if sgae:
            nxt_sid = torch.full((b,), -1, device=device, dtype=torch.long)
            for i in reversed(range(t)):
                m = mask[:, i]
                end = m & (step_ids[:, i] != nxt_sid)
                acc = torch.where(end, r[:, i] + gamma * lam * acc, acc)
                adv[:, i] = torch.where(m, acc, 0.0)
                nxt_sid = torch.where(m, step_ids[:, i], nxt_sid)
            return adv
        nxt_v = torch.zeros(b, device=device)
        for i in reversed(range(t)):
            m = mask[:, i].float()
            delta = r[:, i] + gamma * nxt_v - v[:, i]
            acc_new = delta + gamma * lam * acc
            nxt_v = v[:, i] * m + (1 - m) * nxt_v
            acc = acc_new * m + (1 - m) * acc
            adv[:, i] = acc_new * m
        return adv

    def ours() -> torch.Tensor:
        if sgae:
            return segmented_gae(r, mask, step_ids=step_ids, gamma=gamma, lam=lam)[0]
        return segmented_gae(r, mask, values=v, gamma=gamma, lam=lam)[0]

    err = (loop() - ours()).abs().max().item()  # the two really compute the same thing
    if err > 1e-3:
        raise AssertionError(f"GAE loop and scan disagree by {err}")
    return (loop if impl == "loop" else ours), None


def run_case(spec: str, repeats: int) -> dict:
    kind, impl, *rest = spec.split(":")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "logprobs":
        n, v, dt = int(rest[0]), int(rest[1]), rest[2]
        fn, reset = _logprobs_case(impl, n, v, DTYPES[dt], device)
    elif kind == "linear":
        n, v, h, dt = int(rest[0]), int(rest[1]), int(rest[2]), rest[3]
        fn, reset = _linear_case(impl, n, v, h, DTYPES[dt], device)
    elif kind == "gae":
        fn, reset = _gae_case(impl, int(rest[0]), int(rest[1]), rest[2], device)
    else:
        raise ValueError(f"unknown case kind {kind!r} in {spec!r}")
    if repeats > 1 or device == "cuda":  # warm-up (lazy imports, kernel compilation); big CPU cases run once
        (reset or (lambda: None))()
        fn()
    sec, peak = measure(fn, device, repeats, reset)
    return {"case": spec, "device": device, "seconds": sec, "peak_bytes": peak}


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------
def cases(quick: bool) -> list[tuple[str, str, str, int, int]]:
    """(label, naive spec, ours spec, repeats, GiB of RAM the naive case needs)."""
    out = [
        ("log-probs fwd+bwd N=1024 V=151936 fp32", "logprobs:naive:1024:151936:fp32",
         "logprobs:ours:1024:151936:fp32", 2, 3),
        ("log-probs fwd+bwd N=1024 V=151936 bf16", "logprobs:naive:1024:151936:bf16",
         "logprobs:ours:1024:151936:bf16", 2, 3),
        ("log-probs fwd+bwd, grad in place, N=1024 V=151936 bf16", "logprobs:naive:1024:151936:bf16",
         "logprobs:ours_inplace:1024:151936:bf16", 2, 3),
        ("LM-head+log-probs fwd+bwd N=2048 V=151936 H=256 bf16", "linear:naive:2048:151936:256:bf16",
         "linear:ours:2048:151936:256:bf16", 1, 6),
        ("S-GAE scan B=64 T=8192 (steps ~50 tokens)", "gae:loop:64:8192:sgae", "gae:ours:64:8192:sgae", 5, 1),
        ("S-GAE scan B=64 T=8192, 10% tokens masked inside", "gae:loop:64:8192:sgae_holes",
         "gae:ours:64:8192:sgae_holes", 5, 1),
        ("token GAE + critic B=64 T=8192", "gae:loop:64:8192:token", "gae:ours:64:8192:token", 5, 1),
        ("token GAE + critic B=64 T=8192, 10% tokens masked inside", "gae:loop:64:8192:token_holes",
         "gae:ours:64:8192:token_holes", 5, 1),
    ]
    if not quick:
        out += [
            ("log-probs fwd+bwd N=8192 V=151936 bf16", "logprobs:naive:8192:151936:bf16",
             "logprobs:ours:8192:151936:bf16", 1, 17),
            ("log-probs fwd+bwd, grad in place, N=8192 V=151936 bf16", None,
             "logprobs:ours_inplace:8192:151936:bf16", 1, 8),
        ]
    return out


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return float("inf")


def _sub(spec: str, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("TRITON_INTERPRET", None)  # benchmarks run compiled kernels (CUDA) or torch paths (CPU)
    out = subprocess.run([sys.executable, __file__, "--case", spec, "--repeats", str(repeats)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"case": spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr else f"rc={out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_t(r: dict | None) -> str:
    return "-" if not r or "seconds" not in r else f"{r['seconds'] * 1e3:.1f} ms"


def _fmt_m(r: dict | None) -> str:
    return "-" if not r or "peak_bytes" not in r else f"{r['peak_bytes'] / GIB:.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="run one case in this process and print JSON")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="skip the N=8192 cases")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--only", help="run only the cases whose label contains this text (case-insensitive)")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return 0
    rows, results = [], []
    naive_cache: dict[str, dict] = {}
    for label, naive, ours, reps, need_gib in cases(args.quick):
        if args.only and args.only.lower() not in label.lower():
            continue
        if need_gib > _mem_available_gib():
            rows.append(f"| {label} | skipped: needs ~{need_gib} GiB free RAM | | | | | |")
            continue
        rn = None
        if naive is not None:
            rn = naive_cache.get(naive) or _sub(naive, reps)
            naive_cache[naive] = rn
        else:  # compare against the same-size naive case measured just before
            rn = next((r for k, r in naive_cache.items() if ours.split(":", 2)[2] in k), None)
        ro = _sub(ours, reps)
        results.append({"label": label, "naive": rn, "ours": ro})
        err = (rn or {}).get("error") or ro.get("error")
        if err:
            rows.append(f"| {label} | error: {err} | | | | | |")
            continue
        t_ratio = ro["seconds"] / rn["seconds"] if rn else float("nan")
        m_ratio = ro["peak_bytes"] / rn["peak_bytes"] if rn and rn["peak_bytes"] > (1 << 20) else None
        m_txt = "-" if m_ratio is None else f"{m_ratio:.3f}"
        rows.append(f"| {label} | {_fmt_t(rn)} | {_fmt_t(ro)} | {t_ratio:.3f} | {_fmt_m(rn)} | {_fmt_m(ro)} | {m_txt} |")
        print(rows[-1], flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\ndevice: {device}; ratio = ours / naive (time: lower is faster; memory: peak extra over the inputs)")
    print("| case | naive time | ours time | time ratio | naive peak extra | ours peak extra | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
