"""Time the LoRA linear layer's routes against the cuBLAS base linear (bf16, K = N = 4096, r = 16).

Routes: the base linear alone; the reference (unfused torch ops); HF peft's LoRA layer; the stacked cuBLAS
route (``lora_linear_stacked`` below: x·[W; A]ᵀ then Y += S·(s·B)ᵀ, with [W; A] cached, and re-stacked on every
call as training would); the routes of kernels/lora_routes.py ("fused" pointer kernel, "fused_tma" Hopper
kernel, "cublas" = 3 cuBLAS GEMMs forward and 5 backward, "merged" = one GEMM on a cached W + s·B·A) and the
"auto" backend as it dispatches, both with no gradient wanted (inference) and with x requiring grad (the
forward of a training step); the Triton GEMMs alone (no LoRA term). Also the host time per call (Python +
launches, no sync) of the main routes. (The "triton" backend always runs the Triton kernels: on Hopper with
bf16 that is the "fused_tma" column.)
Forward and forward+backward (grads for x, A, B); ratios to the base, and forward+backward against the
frozen floor (base forward + the dX GEMM: what a frozen layer costs when gradients flow through it).

Medians of triton.testing.do_bench (CUDA events) after warm-up; every call takes the next of several input
sets, so the weights (32 MiB each) do not sit in L2 and small shapes are not flattered. A table goes to
stdout last; --json writes every number.

    python benchmarks/lora_kernel.py [--ms 1 16 256 4096 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from minipeft import kernels
from minipeft.kernels import lora_routes, lora_triton
from minipeft.measure import median_ms

K = N = 4096
R = 16
SCALING = 2.0
DTYPE = torch.bfloat16
N_SETS = 4   # 4 weight sets of 32 MiB each: larger than the H100's 50 MB L2
SKIP_POINTER = False  # --skip-pointer


def lora_linear_stacked(
    x: torch.Tensor, weight_and_A: torch.Tensor, bias_and_zeros: torch.Tensor | None,
    lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """Forward only: one cuBLAS GEMM x·[W; A]ᵀ gives Y and S in one pass over x, then Y += S·(s·B)ᵀ.

    weight_and_A (N + r, K) = torch.cat([W, A]); bias_and_zeros (N + r,) = cat([bias, zeros(r)]) or None.
    Returns a (..., N) view of the (..., N + r) product. A route measured here only (../shared/ANCHORS.md
    predicted ≈1.12× the base at M = 4096), so it lives in the benchmark, not in kernels/.
    """
    N, r = lora_B.shape
    x2d = x.reshape(-1, x.shape[-1])
    ys = torch.mm(x2d, weight_and_A.t()) if bias_and_zeros is None else \
        torch.addmm(bias_and_zeros, x2d, weight_and_A.t())                    # (M, N + r)
    y = ys[:, :N]
    y.addmm_(ys[:, N:], lora_B.t(), alpha=scaling)                            # in place, through the view
    return ys.view(*x.shape[:-1], N + r)[..., :N]


def make_sets(M: int, device: str = "cuda"):
    sets = []
    for i in range(N_SETS):
        g = torch.Generator(device=device).manual_seed(i)
        rnd = lambda *shape, g=g: torch.randn(*shape, device=device, generator=g, dtype=torch.float32)
        w = (rnd(N, K) / math.sqrt(K)).to(DTYPE)
        a = (rnd(R, K) / math.sqrt(K)).to(DTYPE)
        b = (rnd(N, R) / math.sqrt(R)).to(DTYPE)
        x = rnd(M, K).to(DTYPE)
        dy = (rnd(M, N) / math.sqrt(N)).to(DTYPE)
        sets.append(dict(x=x, w=w, a=a, b=b, dy=dy, wa=torch.cat([w, a]).contiguous()))
    return sets


def make_peft_layers(sets):
    """One peft LoRA Linear per input set, sharing the set's tensors."""
    import peft  # here, not at the top: an optional (dev) dependency that only this comparison needs

    layers = []
    for s in sets:
        base = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=DTYPE)
        base.weight.data = s["w"]
        model = torch.nn.Sequential()
        model.add_module("proj", base)
        cfg = peft.LoraConfig(r=R, lora_alpha=int(SCALING * R), target_modules=["proj"], lora_dropout=0.0)
        pm = peft.get_peft_model(model, cfg)
        layer = pm.base_model.model.proj
        layer.lora_A["default"].weight.data = s["a"]
        layer.lora_B["default"].weight.data = s["b"]
        layers.append(pm)
    return layers


def rotating(fn, sets):
    it = itertools.cycle(range(len(sets)))
    return lambda: fn(sets[next(it)])


REP_MS = 200  # --rep


def bench(fn) -> float:
    return do_bench(fn, warmup=REP_MS // 4, rep=REP_MS, return_mode="median") * 1000.0  # µs


def host_us(fn, n: int = 50) -> float:
    """Host time per call (µs): the median of n calls timed without a sync (Python and launches only; the
    launch queue holds them all), after a warm-up call and a sync."""
    fn()
    torch.cuda.synchronize()
    us = median_ms(fn, repeats=n, warmup=0, synchronize=False) * 1e3
    torch.cuda.synchronize()
    return us


def fwd_bwd(forward, grads_of):
    """forward(s) -> y; grads_of(s) -> the leaves to differentiate; backward with the set's dy."""
    def run(s):
        y = forward(s)
        torch.autograd.grad(y, grads_of(s), s["dy"])
    return run


def measure(M: int) -> dict:
    """Check and time every route at one M."""
    sets = make_sets(M)
    try:
        peft_layers = make_peft_layers(sets)
    except Exception as e:  # peft missing: leave its column empty
        print("peft unavailable:", e)
        peft_layers = None
    for i, s in enumerate(sets):
        s["i"] = i
    path_taken = {"train": lora_routes.choose_path(M, N, K, s["x"], s["w"], needs_grad=True),
                  "infer": lora_routes.choose_path(M, N, K, s["x"], s["w"], needs_grad=False)}
    for s in sets:
        s["xg"] = s["x"].detach().clone().requires_grad_(True)
    lora_routes.clear_cache()

    fwd = {
        "base": lambda s: F.linear(s["x"], s["w"]),
        "reference": lambda s: kernels.reference.lora_linear(s["x"], s["w"], None, s["a"], s["b"], SCALING),
        "stacked_cached": lambda s: lora_linear_stacked(s["x"], s["wa"], None, s["b"], SCALING),
        "stacked_restack": lambda s: lora_linear_stacked(s["x"], torch.cat([s["w"], s["a"]]), None, s["b"], SCALING),
        "gemm_ptr": lambda s: lora_triton.fused_gemm(s["x"], s["w"], True, None, None, 1.0, None, None),
        "gemm_tma": lambda s: lora_triton.fused_gemm_tma(s["x"], s["w"], True, None, None, 1.0, None, None),
        "fused": lambda s: lora_routes.lora_linear(s["x"], s["w"], None, s["a"], s["b"], SCALING, path="fused"),
        "fused_tma": lambda s: lora_routes.lora_linear(s["x"], s["w"], None, s["a"], s["b"], SCALING,
                                                       path="fused_tma"),
        "cublas": lambda s: lora_routes.lora_linear(s["x"], s["w"], None, s["a"], s["b"], SCALING,
                                                    path="cublas"),
        "merged": lambda s: lora_routes.lora_linear(s["x"], s["w"], None, s["a"], s["b"], SCALING,
                                                    path="merged"),
        "auto_backend": lambda s: kernels.lora_linear(s["x"], s["w"], None, s["a"], s["b"], SCALING,
                                                      backend="auto"),
        "auto_backend_grad": lambda s: kernels.lora_linear(s["xg"], s["w"], None, s["a"], s["b"], SCALING,
                                                           backend="auto"),
    }
    if peft_layers is not None:
        fwd["peft"] = lambda s: peft_layers[s["i"]](s["x"])
    if SKIP_POINTER:
        del fwd["gemm_ptr"], fwd["fused"]

    # correctness of every LoRA route on set 0, against the reference in fp32
    s0 = sets[0]
    ref32 = kernels.reference.lora_linear(*(s0[k].float() for k in ("x", "w")), None,
                                          s0["a"].float(), s0["b"].float(), SCALING)
    errs = {}
    for name, f in fwd.items():
        if name.startswith("gemm") or name == "base":
            continue
        errs[name] = ((f(s0).float() - ref32).norm() / ref32.norm()).item()

    times = {f"fwd_{k}": bench(rotating(f, sets)) for k, f in fwd.items()}
    host = {k: host_us(rotating(fwd[k], sets)) for k in ("base", "reference", "cublas", "fused_tma",
                                                           "auto_backend", "auto_backend_grad")}

    def leaves(s):
        return [s["x"], s["a"], s["b"]]

    for s in sets:
        for k in ("x", "a", "b"):
            s[k].requires_grad_(True)
    bwd = {
        "floor": fwd_bwd(lambda s: F.linear(s["x"], s["w"]), lambda s: [s["x"]]),
        "reference": fwd_bwd(fwd["reference"], leaves),
        "fused_tma": fwd_bwd(fwd["fused_tma"], leaves),
        "cublas": fwd_bwd(fwd["cublas"], leaves),
        "auto_backend": fwd_bwd(fwd["auto_backend"], leaves),
    }
    if not SKIP_POINTER:
        bwd["fused"] = fwd_bwd(fwd["fused"], leaves)
    host["fb_floor"] = host_us(rotating(bwd["floor"], sets))
    host["fb_auto_backend"] = host_us(rotating(bwd["auto_backend"], sets))
    if peft_layers is not None:
        for pm, s in zip(peft_layers, sets, strict=True):
            layer = pm.base_model.model.proj
            s["peft_leaves"] = [s["x"], layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            for t in s["peft_leaves"]:
                t.requires_grad_(True)
        bwd["peft"] = fwd_bwd(fwd["peft"], lambda s: s["peft_leaves"])
    times.update({f"fb_{k}": bench(rotating(f, sets)) for k, f in bwd.items()})
    row = dict(M=M, path=path_taken, times=times, rel_err=errs, host_us=host)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16, 256, 4096, 16384])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rep", type=int, default=200, help="ms of timed repeats per route (do_bench rep)")
    ap.add_argument("--skip-pointer", action="store_true", help="skip the pointer-kernel routes (saves tuning)")
    args = ap.parse_args()
    global REP_MS, SKIP_POINTER
    REP_MS, SKIP_POINTER = args.rep, args.skip_pointer
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    header = (f"{datetime.date.today()} | {dev} | torch {torch.__version__} | triton {triton.__version__} | "
              f"bf16 K=N={K} r={R}")
    print(header, flush=True)
    rows = []
    for M in args.ms:
        rows.append(measure(M))
        torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)

    print("\n" + header)
    print("forward: µs of the base linear, then each route as a multiple of it")
    cols = ["reference", "peft", "stacked_cached", "stacked_restack", "cublas", "merged", "gemm_ptr",
            "gemm_tma", "fused", "fused_tma", "auto_backend", "auto_backend_grad"]
    short = {"stacked_cached": "stack_cached", "stacked_restack": "stack_restack", "auto_backend": "auto_inf",
             "auto_backend_grad": "auto_train"}
    print(f"{'M':>6} {'base µs':>8} " + " ".join(f"{short.get(c, c)[:13]:>13}" for c in cols) + "  path (train/infer)")
    for row in rows:
        t = row["times"]
        base = t["fwd_base"]
        cells = [f"{t[f'fwd_{c}'] / base:13.3f}" if f"fwd_{c}" in t else f"{'-':>13}" for c in cols]
        print(f"{row['M']:>6} {base:8.1f} " + " ".join(cells) + f"  {row['path']['train']}/{row['path']['infer']}")
    print("forward+backward: µs of the frozen floor (base fwd + dX GEMM), then each route as a multiple of it")
    cols = ["reference", "peft", "cublas", "fused", "fused_tma", "auto_backend"]
    print(f"{'M':>6} {'floor µs':>8} " + " ".join(f"{c[:14]:>14}" for c in cols))
    for row in rows:
        t = row["times"]
        floor = t["fb_floor"]
        cells = [f"{t[f'fb_{c}'] / floor:14.3f}" if f"fb_{c}" in t else f"{'-':>14}" for c in cols]
        print(f"{row['M']:>6} {floor:8.1f} " + " ".join(cells))
    print("host µs per call (Python + launches, no sync)")
    hcols = list(rows[0]["host_us"])
    print(f"{'M':>6} " + " ".join(f"{c[:18]:>18}" for c in hcols))
    for row in rows:
        print(f"{row['M']:>6} " + " ".join(f"{row['host_us'][c]:18.1f}" for c in hcols))
    worst = max(max(r["rel_err"].values()) for r in rows)
    print(f"largest forward relative error vs fp32 reference, any route: {worst:.2e}")


if __name__ == "__main__":
    main()
