"""A LoRA layer on an NF4 base, forward, GPU and host-included time: the fused kernel against dequant + GEMM and bf16.

Rows, for x (M, K) bf16, an NF4 weight (N, K) with double quantization (blocksize 64), r = 16, no bias:
    bf16 linear       F.linear(x, W) on the dense bf16 weight (what the fused kernel is measured against)
    bf16 + LoRA       the reference LoRA layer on the dense bf16 weight
    dequant + GEMM    the Triton dequantization to bf16, F.linear, the low-rank term as torch ops
    fused             "triton": kernels/nf4_lora_triton.py, the 4-bit codes dequantized inside the GEMM (for 1-16
                      rows kernels/nf4_rows_gluon.py, mma.sync with the weight operand made in registers; from
                      nf4_rs_gluon.MIN_ROWS rows on a Hopper GPU kernels/nf4_rs_gluon.py, wgmma with Ŵ made
                      in its operand's registers)
    auto              what "auto" runs (nothing here needs a gradient: the fused kernels up to
                      kernels.NF4_FUSED_MAX_ROWS rows, from kernels.NF4_MERGED_MIN_ROWS on the merged weight
                      Ŵ + s·B·A made from the codes and one GEMM)
    bnb matmul_4bit   bitsandbytes' 4-bit matmul (no LoRA term), when bitsandbytes is installed
    read the codes    a Triton kernel that only reads the 4-bit codes (K·N/2 bytes) and folds them into one word
                      per program: for a few rows, what an NF4 forward cannot avoid reading (the absmax and x
                      left out), so the floor under the fused row there
Two timers, side by side (the ones of benchmarks/lora_kernel.py):
    GPU   ``triton.testing.do_bench_cudagraph``: the call replayed from a CUDA graph, the host out of the picture
    host  eager wall time per call, host included: 20 calls back to back, one synchronize, divided by 20 (the
          median of 5 such runs; ``lora_kernel.host_us``)
Every cell is measured in each of ``--rounds`` interleaved rounds; the table gives each row as a multiple of the
bf16 linear of the same round and timer, the median over rounds with the spread (max/min − 1) of that ratio.

    python benchmarks/nf4_lora.py [--ms 1 4 16 256 4096] [--k 4096] [--n 4096] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from lora_kernel import host_us  # benchmarks/ is not a package: run as a script, its own folder is on sys.path
from triton.testing import do_bench_cudagraph

from minipeft import kernels
from minipeft.quant import dequantize_nf4, quantize_nf4
from minipeft.quant.nf4 import kernel_arguments


@triton.jit
def _read_kernel(words_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    """out[program] = the XOR of BLOCK words of the codes: every byte read once, next to nothing computed."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(tl.load(words_ptr + offs, mask=offs < n_words, other=0), 0))


def read_codes(codes: torch.Tensor):
    """A call that reads the packed codes once (as 32-bit words, 2,048 a program of 4 warps)."""
    if codes.numel() % 4:
        raise ValueError(f"read_codes: {codes.numel()} bytes of codes; needs K·N a multiple of 8 (whole 32-bit words)")
    words = codes.view(torch.int32)
    grid = (triton.cdiv(words.numel(), 2048),)
    out = torch.empty(grid[0], device=codes.device, dtype=torch.int32)
    return lambda: _read_kernel[grid](words, out, words.numel(), BLOCK=2048, num_warps=4)


def rows_for(M: int, K: int, N: int, r: int = 16) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
    q = quantize_nf4(w, 64, True)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    a = (torch.randn(r, K, device="cuda", generator=g) / K ** 0.5).to(torch.bfloat16)
    b = (torch.randn(N, r, device="cuda", generator=g) / r ** 0.5).to(torch.bfloat16)
    state = kernel_arguments(q)

    def qlora(backend):
        return lambda: kernels.nf4_lora_linear(x, *state, None, N, K, 64, q.dq_blocksize, a, b, 2.0,
                                               backend=backend)

    def dequant_gemm():
        y = kernels.nf4_linear(x, *state, None, N, K, 64, q.dq_blocksize, backend="triton")
        return y + 2.0 * F.linear(F.linear(x, a), b)

    fns = {
        "bf16 linear": lambda: F.linear(x, w),
        "bf16 + LoRA": lambda: kernels.lora_linear(x, w, None, a, b, 2.0, backend="reference"),
        "dequant + GEMM": dequant_gemm,
        "fused": qlora("triton"),
        "auto": qlora("auto"),
    }
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f

        packed, bnb_state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fns["bnb matmul_4bit"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)
    except Exception as e:  # not installed here
        print(f"bitsandbytes row skipped: {type(e).__name__}: {e}")
    fns["read the codes"] = read_codes(state[0])
    ref = F.linear(x.float(), dequantize_nf4(q, torch.float32)) + 2.0 * (x.float() @ a.float().t()) @ b.float().t()
    errors = {n: ((fns[n]().float() - ref).norm() / ref.norm()).item() for n in ("fused", "auto")}
    return fns, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 256, 4096])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep", type=int, default=50, help="ms of repeats per measurement")
    args = ap.parse_args()
    header = (f"{datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"triton {triton.__version__} | bf16, K={args.k}, N={args.n}, r=16, NF4 blocksize 64 + double quant")
    print(header, flush=True)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: the spread needs two rounds")
    # times[M][timer][row]: one value per round; timer "gpu" (CUDA-graph replay) or "host" (eager, host included)
    times: dict[int, dict[str, dict[str, list[float]]]] = {}
    errors = {}
    for _ in range(args.rounds):
        for M in args.ms:
            fns, errors[M] = rows_for(M, args.k, args.n)
            t = times.setdefault(M, {"gpu": {}, "host": {}})
            for name, fn in fns.items():
                fn()
                t["gpu"].setdefault(name, []).append(do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e3)
                t["host"].setdefault(name, []).append(host_us(fn))

    def ratio_cell(values: list[float], base: list[float]) -> str:
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        return f"{statistics.median(ratios):.2f} ±{(max(ratios) / min(ratios) - 1) * 100:.0f}%"

    names = list(next(iter(times.values()))["gpu"])
    print(f"\n{header}\nforward; each row × the bf16 linear of the same round and timer, median over {args.rounds} "
          "rounds (± spread of the ratio between rounds); GPU = CUDA-graph replay, host = eager with the host included")
    print("| M | bf16 linear µs GPU / host | " + " | ".join(f"{n} GPU / host" for n in names[1:])
          + " | fused / auto rel. error |")
    print("|---|---|" + "---|" * len(names))
    for M, t in times.items():
        gpu, host = t["gpu"], t["host"]
        cells = [f"{ratio_cell(gpu[n], gpu['bf16 linear'])} / {ratio_cell(host[n], host['bf16 linear'])}"
                 for n in names[1:]]
        print(f"| {M} | {statistics.median(gpu['bf16 linear']):.1f} / {statistics.median(host['bf16 linear']):.1f} | "
              + " | ".join(cells) + f" | {errors[M]['fused']:.1e} / {errors[M]['auto']:.1e} |")


if __name__ == "__main__":
    main()
