"""Time one LoRA layer's routes at the widths of GPT-2 small/medium: GPU time and host-included time.

What is measured, per (K → N, M, r), bf16, no bias:

    forward (no gradient wanted), as a multiple of the cuBLAS base linear F.linear(x, W):
        gemm_tma   the Triton TMA GEMM alone (no LoRA term): how close the kernel under "triton" is to cuBLAS
        reference  the reference's torch ops (kernels/reference.py)
        triton     the "triton" backend: one fused Triton GEMM (S rides along)
        merged     "auto" for inference: one cuBLAS GEMM on the cached W + s·B·A
        stacked    x·[W; A]ᵀ (one cuBLAS GEMM gives Y and S), then Y += S·(s·B)ᵀ (``lora_linear_stacked``)
    forward + backward (gradients for x, A, B), as a multiple of the frozen floor = F.linear(x, W) with only
    x wanting a gradient (the base forward + the dX GEMM: what a frozen layer costs in training):
        reference, cublas (kernels/lora_routes.py: 3 GEMMs forward, 5 backward), triton, auto (eager rules)

Two timers, side by side:
    GPU   ``triton.testing.do_bench_cudagraph``: the call captured in a CUDA graph and replayed, so the host
          (Python, launches) is out of the picture: what the kernels cost when torch.compile's CUDA graphs or
          a captured training step run them. One input set (weights of these widths sit in the 50 MB L2).
    host  eager wall time per call: 20 calls back to back, one synchronize at the end, divided by 20 (the
          median of 5 such runs): the Python and launch cost of each op included, as in an eager training step.
The rows run in ``--rounds`` interleaved rounds (every cell once, then every cell again), and the table gives
the median over rounds with the spread (max/min − 1) of each ratio. The first round also autotunes the Triton
kernels (Triton keeps the winners on disk).

    python benchmarks/lora_kernel.py                                  # the default grid (~5 min on an H200)
    python benchmarks/lora_kernel.py --shapes 768x2304 --ms 4096 7936 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from minipeft import kernels
from minipeft.kernels import lora_routes, lora_triton

SCALING = 2.0
DTYPE = torch.bfloat16


def lora_linear_stacked(
    x: torch.Tensor, weight_and_A: torch.Tensor, bias_and_zeros: torch.Tensor | None,
    lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """Forward only: one cuBLAS GEMM x·[W; A]ᵀ gives Y and S in one pass over x, then Y += S·(s·B)ᵀ.

    weight_and_A (N + r, K) = torch.cat([W, A]); bias_and_zeros (N + r,) = cat([bias, zeros(r)]) or None.
    Returns a (..., N) view of the (..., N + r) product. A route measured here only, so it lives in the
    benchmark, not in kernels/.
    """
    N, r = lora_B.shape
    x2d = x.reshape(-1, x.shape[-1])
    ys = torch.mm(x2d, weight_and_A.t()) if bias_and_zeros is None else \
        torch.addmm(bias_and_zeros, x2d, weight_and_A.t())                    # (M, N + r)
    y = ys[:, :N]
    y.addmm_(ys[:, N:], lora_B.t(), alpha=scaling)                             # Y += S·(s·B)ᵀ
    return y.view(*x.shape[:-1], N)


def make_inputs(M: int, K: int, N: int, r: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    t = dict(x=randn(M, K).to(DTYPE), w=(randn(N, K) / K ** 0.5).to(DTYPE), a=(randn(r, K) / K ** 0.5).to(DTYPE),
             b=(randn(N, r) / r ** 0.5).to(DTYPE), dy=randn(M, N).to(DTYPE))
    t["wa"] = torch.cat([t["w"], t["a"]])
    t["xg"], t["ag"], t["bg"] = (t[k].detach().clone().requires_grad_(True) for k in ("x", "a", "b"))
    return t


def routes(t: dict) -> tuple[dict, dict]:
    """(forward routes, forward+backward routes) as zero-argument callables on the inputs t."""
    x, w, a, b = t["x"], t["w"], t["a"], t["b"]
    xg, ag, bg, dy = t["xg"], t["ag"], t["bg"], t["dy"]
    lora = lambda backend, x_, a_, b_: kernels.lora_linear(x_, w, None, a_, b_, SCALING, backend=backend)  # noqa: E731
    fwd = {
        "base": lambda: F.linear(x, w),
        "gemm_tma": lambda: lora_triton.fused_gemm_tma(x, w, True, None, None, 1.0),
        "reference": lambda: lora("reference", x, a, b),
        "triton": lambda: lora("triton", x, a, b),
        "merged": lambda: lora_routes.lora_linear(x, w, None, a, b, SCALING, path="merged"),
        "stacked": lambda: lora_linear_stacked(x, t["wa"], None, b, SCALING),
    }

    def grads_of(y, leaves):
        return lambda: torch.autograd.grad(y(), leaves, dy)

    fb = {
        "floor": grads_of(lambda: F.linear(xg, w), [xg]),
        "reference": grads_of(lambda: lora("reference", xg, ag, bg), [xg, ag, bg]),
        "cublas": grads_of(lambda: lora_routes.lora_linear(xg, w, None, ag, bg, SCALING, path="cublas"),
                           [xg, ag, bg]),
        "triton": grads_of(lambda: lora("triton", xg, ag, bg), [xg, ag, bg]),
        "auto": grads_of(lambda: lora("auto", xg, ag, bg), [xg, ag, bg]),
    }
    return fwd, fb


def gpu_us(fn, rep_ms: int) -> float:
    """Median µs of one call replayed from a CUDA graph (no host work inside the timing)."""
    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def host_us(fn, calls: int = 20, runs: int = 5) -> float:
    """Eager µs per call with the host included: `calls` calls back to back, one sync, divided (median of runs)."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per_call)


def check(fwd: dict, fb: dict, t: dict) -> dict:
    """Relative error of each LoRA route against the fp32 reference (forward output, then dA of fwd+bwd)."""
    up = {k: t[k].float() for k in ("x", "w", "a", "b")}
    ref = kernels.reference.lora_linear(up["x"], up["w"], None, up["a"], up["b"], SCALING)
    err = {k: ((f().float() - ref).norm() / ref.norm()).item() for k, f in fwd.items() if k not in ("base", "gemm_tma")}
    leaves = [up["x"].requires_grad_(), up["a"].requires_grad_(), up["b"].requires_grad_()]
    ref_grads = torch.autograd.grad(kernels.reference.lora_linear(leaves[0], up["w"], None, leaves[1], leaves[2],
                                                                  SCALING), leaves, t["dy"].float())
    for k, f in fb.items():
        if k != "floor":
            grads = f()
            err[f"grad_{k}"] = max(((g.float() - r).norm() / r.norm()).item()
                                   for g, r in zip(grads, ref_grads, strict=True))
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["768x2304", "3072x768", "4096x4096"],
                    help="K x N widths (GPT-2 small: 768x2304 c_attn, 768x768, 768x3072, 3072x768)")
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 4096, 7936, 16384])
    ap.add_argument("--r", type=int, nargs="+", default=[16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep", type=int, default=50, help="ms of repeats per GPU-time measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: the spread needs two rounds")
    torch.backends.cuda.matmul.allow_tf32 = False
    header = (f"{datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"triton {triton.__version__} | bf16, no bias, scaling {SCALING}")
    print(header, flush=True)
    cells = [(tuple(int(v) for v in s.split("x")), M, r) for s in args.shapes for M in args.ms for r in args.r]
    samples: dict[tuple, dict[str, list[float]]] = {}
    errors: dict[tuple, dict] = {}
    for rnd in range(args.rounds):
        for (K, N), M, r in cells:
            key = (K, N, M, r)
            t = make_inputs(M, K, N, r)
            fwd, fb = routes(t)
            if rnd == 0:
                errors[key] = check(fwd, fb, t)  # also the warm-up: autotuning, the merged weight's cache
            got = samples.setdefault(key, {})
            for kind, table in (("fwd", fwd), ("fb", fb)):
                for name, fn in table.items():
                    got.setdefault(f"{kind}_{name}_gpu", []).append(gpu_us(fn, args.rep))
                    got.setdefault(f"{kind}_{name}_host", []).append(host_us(fn))
            lora_routes.clear_cache()
            del t, fwd, fb
            print(f"round {rnd + 1}: K={K} N={N} M={M} r={r} done", flush=True)

    def ratio_cell(key, kind, name, base, timer) -> str:
        s = samples[key]
        ratios = [v / b for v, b in zip(s[f"{kind}_{name}_{timer}"], s[f"{kind}_{base}_{timer}"], strict=True)]
        spread = max(ratios) / min(ratios) - 1
        return f"{statistics.median(ratios):.2f} ±{spread * 100:.0f}%"

    rows = []
    print("\n" + header)
    print(f"median over {args.rounds} rounds; ±: spread of the ratio between rounds; GPU = CUDA-graph replay, "
          "host = eager with the host included")
    for kind, base, names in (("fwd", "base", ["gemm_tma", "reference", "triton", "merged", "stacked"]),
                              ("fb", "floor", ["reference", "cublas", "triton", "auto"])):
        title = ("forward (no grad), × the cuBLAS base linear" if kind == "fwd" else
                 "forward + backward (grads x, A, B), × the frozen floor (base fwd + dX GEMM)")
        print(f"\n{title}\n| K → N | M | r | {base} µs GPU / host | " + " | ".join(f"{n} GPU / host" for n in names)
              + " |")
        print("|---|---|---|---|" + "---|" * len(names))
        for key in samples:
            K, N, M, r = key
            s = samples[key]
            b_gpu, b_host = statistics.median(s[f"{kind}_{base}_gpu"]), statistics.median(s[f"{kind}_{base}_host"])
            line = [f"{K} → {N}", str(M), str(r), f"{b_gpu:.1f} / {b_host:.1f}"]
            line += [f"{ratio_cell(key, kind, n, base, 'gpu')} / {ratio_cell(key, kind, n, base, 'host')}"
                     for n in names]
            print("| " + " | ".join(line) + " |")
    for key, s in samples.items():
        rows.append(dict(K=key[0], N=key[1], M=key[2], r=key[3], us=s, rel_err=errors[key]))
    worst = max(max(e.values()) for e in errors.values())
    print(f"\nlargest relative error against the fp32 reference (forward and gradients), any route: {worst:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
