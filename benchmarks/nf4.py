"""NF4 dequantization throughput on CUDA: minipeft (eager, torch.compile, Triton) against bitsandbytes.

Each case dequantizes a bf16 weight stored with double quantization (blocksize 64) back to bf16. Throughput
counts the bytes the job must move, the same for every method: the packed codes (n/2), the absmax codes
(n/64), the fp32 scales (4·n/16384) read, and the bf16 weight (2n) written. Times are medians of
``triton.testing.do_bench_cudagraph`` (the calls captured in a CUDA graph, so the time is the GPU's and not the
Python launch overhead, which at 4096² is as long as the kernel), rotating over several weights so that no
run is served from L2; the plain ``do_bench`` time, launch overhead included, is printed beside it. A method
that cannot be captured in a CUDA graph falls back to ``do_bench`` in the GPU column too, marked † (not GPU time).
Every (size, method) cell is timed in each of ``--rounds`` interleaved rounds (default 2); the table gives the
median time [min–max] and each ratio to bitsandbytes as the median of the per-round ratios (± their spread).
The first part checks correctness on the GPU: minipeft's codes against bitsandbytes' CUDA quantizer, and
both dequantizers on one state; the error column is each fast path's max |Δ| against the eager dequantization
("n/a" for bitsandbytes, which is checked in that first part instead).
Run: ``python benchmarks/nf4.py [--sizes 4096 8192] [--rounds 2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from minipeft.kernels.nf4_triton import nf4_dequantize_triton
from minipeft.quant import dequantize_nf4, quantize_nf4
from minipeft.quant.nf4 import NF4_CODEBOOK, SIGNED_DYNAMIC_MAP


def _bnb_state(q, bnb_functional):
    """A bitsandbytes QuantState holding minipeft's NF4Weight ``q`` (double quant), for bnb's dequantizer."""
    QuantState = bnb_functional.QuantState
    state2 = QuantState(
        absmax=q.absmax_scale,
        code=bnb_functional.create_dynamic_map().to(q.device),
        blocksize=q.dq_blocksize,
        dtype=torch.float32,
    )
    code = bnb_functional.get_4bit_type("nf4", device=q.device)
    return QuantState(
        absmax=q.absmax_codes,
        shape=q.shape,
        dtype=q.dtype,
        blocksize=q.blocksize,
        code=code,
        quant_type="nf4",
        offset=q.absmax_offset,
        state2=state2,
    )


def check_against_bnb(F_bnb, sizes) -> list[dict]:
    """Codes and statistics vs bitsandbytes' CUDA quantizer; dequantized values vs its dequantizer."""
    rows = []
    torch.manual_seed(0)
    cases = [(f"randn {n}x{n} bf16", torch.randn(n, n, device="cuda").bfloat16()) for n in sizes]
    edge = torch.randn(1000, 77, device="cuda")
    edge[:3] = 0  # whole blocks of zeros
    cases += [
        ("zeros+partial 1000x77 fp32", edge),
        ("odd 333x5 fp16", torch.randn(333, 5, device="cuda").half()),
    ]
    cases += [("transposed 512x384 fp32", torch.randn(384, 512, device="cuda").t())]
    for name, w in cases:
        q = quantize_nf4(w, blocksize=64, double_quant=True)
        bq, bs = F_bnb.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        mine = dequantize_nf4(q).float()  # in w's dtype, like bnb's output
        theirs_same_state = F_bnb.dequantize_4bit(q.codes.view(-1, 1), _bnb_state(q, F_bnb)).float()
        q_plain = quantize_nf4(w, blocksize=64, double_quant=False)
        _, bs_plain = F_bnb.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
        rows.append(
            {
                "case": name,
                "code_mismatches": int((q.codes != bq.view(-1)).sum()),
                "absmax_fp32_equal": bool(torch.equal(q_plain.absmax, bs_plain.absmax)),
                "absmax_code_mismatches": int((q.absmax_codes != bs.absmax).sum()),
                "n_blocks": q.absmax_codes.numel(),
                "offset_equal": bool(torch.equal(q.absmax_offset, bs.offset)),
                "dequant_max_abs_diff_same_state": float(
                    (mine.reshape(-1) - theirs_same_state.reshape(-1)).abs().max()
                ),
                "dequant_max_abs": float(mine.abs().max()),
            }
        )
    return rows


def bench(F_bnb, sizes, rounds: int, n_rotate: int = 4) -> tuple[list[dict], list[dict]]:
    """Per size and method, one GPU time and one launch-included time per round (µs); also the Triton sweep.

    The Triton tiling sweep runs once, before the rounds, and picks the "best" row's tiling. Then every
    (size, method) cell is timed once per round, round after round, so a slow moment of the machine lands on
    all methods alike. A method whose CUDA-graph capture fails is timed by plain ``do_bench`` in its GPU
    column too, and its row says so (``gpu_timer``)."""
    nf4_values, dq_values = NF4_CODEBOOK.cuda(), SIGNED_DYNAMIC_MAP.cuda()
    # dynamic=False: one static kernel per shape (after a second size, the default recompiles with a symbolic
    # numel, which made the 8192² kernels several times slower)
    compiled = torch.compile(dequantize_nf4, fullgraph=True, dynamic=False)

    def triton_fn(q, bpp=None, warps=4):
        return nf4_dequantize_triton(
            q.codes,
            q.absmax_codes,
            q.absmax_scale,
            q.absmax_offset,
            nf4_values,
            dq_values,
            q.numel,
            q.blocksize,
            q.dq_blocksize,
            torch.bfloat16,
            blocks_per_program=bpp,
            num_warps=warps,
        ).view(q.shape)

    def rotating(fn, items):
        it = itertools.cycle(items)
        return lambda: fn(next(it))

    def timed(fn) -> tuple[float, bool]:
        """(µs of one call, whether it is GPU time): the median over CUDA-graph replays, or, when the method
        cannot be captured, the launch-included ``do_bench`` time, flagged False."""
        try:
            return do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3, True
        except Exception as e:  # a method that cannot be captured: say so, keep going
            print(f"cudagraph timing failed ({type(e).__name__}: {e}); using plain do_bench, marked in the table")
            return timed_launch(fn), False

    def timed_launch(fn):  # µs per call when called from Python in a loop, launch overhead included
        return do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e3

    sweep, cells = [], {}  # cells[n] = (bytes moved, {method: fn}, {method: max abs error vs eager or None})
    for n in sizes:
        numel = n * n
        nbytes = numel // 2 + numel // 64 + 4 * math.ceil(numel / 64 / 256) + 4 + 2 * numel
        ws = [torch.randn(n, n, device="cuda").bfloat16() for _ in range(n_rotate)]
        qs = [quantize_nf4(w) for w in ws]
        bnb = [F_bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in ws]
        del ws

        best = None
        for elems, warps in itertools.product((1024, 2048, 4096, 8192, 16384), (4, 8)):
            t, _ = timed(rotating(lambda q, e=elems, nw=warps: triton_fn(q, e // 64, nw), qs))
            sweep.append({"n": n, "elements_per_program": elems, "num_warps": warps, "us": t})
            if best is None or t < best[0]:
                best = (t, elems, warps)
        best_fn = lambda q, e=best[1], nw=best[2]: triton_fn(q, e // 64, nw)  # noqa: E731
        best_name = f"minipeft Triton (best: {best[1]} el/prog, {best[2]} warps)"

        # correctness of the fast paths against the eager reference, on the GPU (bitsandbytes: not measured here,
        # its dequantizer is checked against minipeft's on one state in check_against_bnb)
        ref = dequantize_nf4(qs[0]).float()
        fast = {"minipeft torch.compile": compiled, "minipeft Triton (default config)": triton_fn, best_name: best_fn}
        errors = {"bitsandbytes dequantize_4bit": None, "minipeft eager": 0.0,
                  **{name: float((fn(qs[0]).float() - ref).abs().max()) for name, fn in fast.items()}}
        fns = {
            "bitsandbytes dequantize_4bit": rotating(lambda b: F_bnb.dequantize_4bit(b[0], b[1]), bnb),
            "minipeft eager": rotating(dequantize_nf4, qs),
            "minipeft torch.compile": rotating(compiled, qs),
            "minipeft Triton (default config)": rotating(triton_fn, qs),
            best_name: rotating(best_fn, qs),
        }
        cells[n] = (nbytes, fns, errors)

    samples: dict[tuple[int, str], dict[str, list]] = {}
    for rnd in range(rounds):
        for n, (_, fns, _) in cells.items():
            for name, fn in fns.items():
                us, is_gpu = timed(fn)
                got = samples.setdefault((n, name), {"us": [], "graph": [], "us_launch": []})
                got["us"].append(us)
                got["graph"].append(is_gpu)
                got["us_launch"].append(timed_launch(fn))
            print(f"round {rnd + 1}: {n}² done", flush=True)
    rows = []
    for (n, name), got in samples.items():
        nbytes, _, errors = cells[n]
        rows.append({"n": n, "method": name, "us": got["us"], "us_launch": got["us_launch"],
                     "gpu_timer": "cudagraph" if all(got["graph"]) else "do_bench (graph capture failed)",
                     "GB/s": nbytes / statistics.median(got["us"]) / 1e3, "max_abs_err_vs_eager": errors[name]})
    torch.cuda.empty_cache()
    return rows, sweep


def copy_ceiling() -> float:
    """Device-to-device copy bandwidth, bytes read + written, in GB/s (the roofline for this job)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    us = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median") * 1e3
    return 2 * x.numel() / us / 1e3


def print_table(meta: dict, ceiling: float, rows: list[dict], rounds: int) -> None:
    """One line per (size, method); ratios to bitsandbytes are medians of per-round ratios (± their spread)."""
    def ratio(base: list[float], mine: list[float]) -> str:  # throughput ratio = bnb time / this time, per round
        ratios = [b / m for b, m in zip(base, mine, strict=True)]
        return f"{statistics.median(ratios):.2f}× ±{(max(ratios) / min(ratios) - 1) * 100:.0f}%"

    print(f"\n## NF4 dequantization, bf16 out, double quant, blocksize 64 — {meta}")
    print(f"copy ceiling (read + write): {ceiling:.0f} GB/s; times: median over {rounds} interleaved rounds "
          "[min–max]; × bitsandbytes: the median of the per-round ratios (± their spread, max/min − 1)")
    print(
        "| weight | method | GPU µs (graph) | GB/s | × bitsandbytes throughput | µs with launch "
        "(do_bench) | × bnb with launch | max abs err vs eager |"
    )
    print("|---|---|---|---|---|---|---|---|")
    fallback = False
    for n in dict.fromkeys(r["n"] for r in rows):
        base = next(r for r in rows if r["n"] == n and r["method"].startswith("bitsandbytes"))
        for r in (r for r in rows if r["n"] == n):
            mark = "" if r["gpu_timer"] == "cudagraph" else " †"
            ratio_mark = " †" if mark or base["gpu_timer"] != "cudagraph" else ""  # a ratio with a fallback time
            fallback |= bool(ratio_mark)
            us, launch = r["us"], r["us_launch"]
            err = "n/a" if r["max_abs_err_vs_eager"] is None else (
                "(the reference)" if r["method"] == "minipeft eager" else f"{r['max_abs_err_vs_eager']:.2g}")
            print(
                f"| {n}² | {r['method']} | {statistics.median(us):.1f} [{min(us):.1f}–{max(us):.1f}]{mark} | "
                f"{r['GB/s']:.0f}{mark} | {ratio(base['us'], us)}{ratio_mark} | {statistics.median(launch):.1f} "
                f"[{min(launch):.1f}–{max(launch):.1f}] | {ratio(base['us_launch'], launch)} | {err} |"
            )
    if fallback:
        print("† CUDA-graph capture failed for this method (or, in a ratio, for bitsandbytes) in at least one round: "
              "its GPU column holds plain do_bench time there, launch overhead included, not GPU time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (≥ 2: the spread needs two)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the spread needs two rounds")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4.py needs a CUDA device")
    # here, after the CUDA check: bitsandbytes is an optional (dev) dependency that needs a GPU
    import bitsandbytes
    import bitsandbytes.functional as F_bnb

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "rounds": args.rounds,
    }
    checks = check_against_bnb(F_bnb, args.sizes)
    ceiling = copy_ceiling()
    rows, sweep = bench(F_bnb, args.sizes, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "checks": checks, "copy_GBps": ceiling, "rows": rows, "sweep": sweep},
                f,
                indent=1,
            )

    print("\n## correctness on the GPU (blocksize 64, double quant)")
    for c in checks:
        print(
            f"  {c['case']:<28} NF4 code mismatches vs bnb CUDA {c['code_mismatches']}; fp32 absmax equal: "
            f"{c['absmax_fp32_equal']}; DQ-code mismatches: {c['absmax_code_mismatches']}/{c['n_blocks']}; "
            f"offset equal: {c['offset_equal']}; |mine - bnb dequant(same state)| max "
            f"{c['dequant_max_abs_diff_same_state']:.3g} (|w| max {c['dequant_max_abs']:.3g})"
        )
    print_table(meta, ceiling, rows, args.rounds)


if __name__ == "__main__":
    main()
