"""What the base's precision costs in training: one table for LoRA on a 16-, an 8- and a 4-bit base.

LoRA on a frozen base trains a few adapter matrices; the rest of training memory is the base's weights and
what autograd keeps for backward. Quantizing the base's Linear layers shrinks the weights (16 → 8 → ~4.13
bits each, LLM.int8(): https://arxiv.org/abs/2208.07339, QLoRA: https://arxiv.org/abs/2305.14314); it must
not grow what backward keeps, which is why the quantized layers save their codes and dequantize again in
backward (kernels/nf4_autograd.py, kernels/int8_autograd.py) instead of keeping a dense copy of every weight:

    base     weights   adapter   gradients   optimizer   kept for backward   peak in training
    16-bit   W₁₆       A         A           2A (AdamW)  activations         measured
    8-bit    ~W₁₆/2    A         A           2A          activations         measured
    4-bit    ~W₁₆/4    A         A           2A          activations         measured

Columns: ``weights`` (every parameter and buffer), ``adapter``, ``gradients`` and ``optimizer`` (AdamW's two
moments and step counts) are ``measure.state_bytes``, exact tensor bytes after one optimizer step.
``kept_for_backward`` is the bytes of the tensors autograd saves in one forward that the model does not
own anyway (not a parameter or buffer: activations, and a dequantized weight if a layer kept one), each
storage counted once (``saved_tensors_hooks``). ``peak_mb`` is measured (``measure.reset_peak_memory`` /
``peak_memory_mb``): the most memory in use during ``steps`` AdamW steps, counted from before the model was
built (so the built model is in it, the transient dense copy that quantizing starts from is not): the CUDA
allocator's peak, or on the CPU the process's peak resident set. The CPU figure is only fair in a fresh
process per row (a process's resident memory does not shrink back), which is what running this module does:

    python -m minipeft.memory_report --preset default --device cpu      # one fresh process per row

Every row starts from the same base cast to ``dtype`` (bf16 by default): the 16-bit row is that base, the
8- and 4-bit rows quantize its Linear layers (``quantize_model(..., bits=8 | 4)``), and LoRA is attached
the same way to all three, so the rows differ in the Linear weights' format alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

from minipeft.measure import peak_memory_mb, reset_peak_memory, state_bytes
from minipeft.pretrain import load_base
from minipeft.quant import quantize_model
from minipeft.tuners import LoraConfig, get_peft_model

__all__ = ["BITS", "COLUMNS", "memory_row", "memory_report", "format_memory_table"]

BITS = (16, 8, 4)
COLUMNS = ["bits", "weights", "adapter", "gradients", "optimizer", "kept_for_backward", "peak_mb"]


def _build(base: nn.Module, bits: int, lora_config: LoraConfig, dtype: torch.dtype, device: torch.device):
    model = copy.deepcopy(base).to(dtype=dtype)  # the 16-bit base, where `base` is (the CPU for a cached one)
    if bits != 16:
        model = quantize_model(model, "all-linear", bits=bits)  # there too: a dense copy never reaches `device`
    return get_peft_model(model.to(device), copy.deepcopy(lora_config))


def _kept_for_backward(model: nn.Module, loss_fn) -> int:
    """Bytes autograd saves in one forward, not counting storage the model owns (parameters, buffers)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    del loss
    return sum(kept.values())


def memory_row(base: nn.Module, bits: int, lora_config: LoraConfig, idx: torch.Tensor, targets: torch.Tensor, *,
               dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", steps: int = 2) -> dict:
    """One row of the table: LoRA (``lora_config``) on ``base`` with its Linear layers in ``bits`` (16: the
    base as it is, in ``dtype``; 8: Int8Linear; 4: NF4Linear), trained ``steps`` AdamW steps on (idx, targets).

    ``base`` is not modified (each row builds from a copy). Byte counts are ints; ``peak_mb`` is MiB.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    device = torch.device(device)
    idx, targets = idx.to(device), targets.to(device)

    def loss_fn(m):
        return m(idx, targets=targets)[1]

    baseline = reset_peak_memory(device)  # before the model exists
    model = _build(base, bits, lora_config, dtype, device).train()
    reset_peak_memory(device)  # the peak of training (the built model included), not of quantizing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for _ in range(steps):
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = peak_memory_mb(device) - baseline
    del opt
    sizes = state_bytes(model, loss_fn)
    return {"bits": bits, "weights": sizes["weights"], "adapter": sizes["trainable"],
            "gradients": sizes["gradients"], "optimizer": sizes["optimizer_state"],
            "kept_for_backward": _kept_for_backward(model, loss_fn), "peak_mb": peak}  # fmt: skip


def memory_report(base: nn.Module, lora_config: LoraConfig, idx: torch.Tensor, targets: torch.Tensor, *,
                  bits: Sequence[int] = BITS, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu", steps: int = 2) -> list[dict]:  # fmt: skip
    """``memory_row`` for each of ``bits``, in this process (on the CPU, run the module instead for fair
    peaks: see the module docstring)."""
    return [memory_row(base, b, lora_config, idx, targets, dtype=dtype, device=device, steps=steps) for b in bits]


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def format_memory_table(rows: list[dict], device_name: str = "") -> str:
    """The rows as a text table in MiB, with each row's weights and peak as a ratio of the 16-bit row's."""
    ref = next((r for r in rows if r["bits"] == 16), rows[0])
    header = ["base", "weights MiB", "adapter MiB", "grads MiB", "optimizer MiB", "kept for bwd MiB", "peak MiB",
              "weights ×", "peak ×"]  # fmt: skip
    lines = [[f"{r['bits']}-bit", _mib(r["weights"]), _mib(r["adapter"]), _mib(r["gradients"]), _mib(r["optimizer"]),
              _mib(r["kept_for_backward"]), f"{r['peak_mb']:.1f}", f"{r['weights'] / ref['weights']:.2f}",
              f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref["peak_mb"] > 0 else "-"] for r in rows]  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(([device_name] if device_name else []) + out)


# ------------------------------------------------------------------------------------------ the command
def _arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minipeft.memory_report",
                                description="training memory of LoRA on a 16-, 8- and 4-bit base")  # fmt: skip
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="the cached base model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bits", default="16,8,4", help="comma-separated, from 16, 8, 4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per row (at most the base's block_size)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank, on every Linear layer")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one row, printed as JSON
    return p.parse_args(argv)


def _row_from_args(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    base = load_base(args.preset, train_if_missing=False, progress=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.config.vocab_size, (args.batch, args.seq + 1), generator=g)
    lora = LoraConfig(r=args.r, lora_alpha=args.r, target_modules="all-linear")
    return memory_row(base, args.worker, lora, tokens[:, :-1], tokens[:, 1:], device=device, steps=args.steps)


def main(argv: list[str] | None = None) -> int:
    """Print the table, each row measured in a fresh process (``--worker``)."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        print(json.dumps(_row_from_args(args)))
        return 0
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        cmd = [sys.executable, "-m", "minipeft.memory_report", *(argv if argv is not None else sys.argv[1:]),
               "--worker", str(bits)]  # fmt: skip
        # freed tensors go back to the OS at once (glibc otherwise keeps small ones), so RSS follows the tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(format_memory_table(rows, f"{name} · preset {args.preset} · batch {args.batch} × {args.seq} · LoRA "
                                    f"r={args.r} on every Linear · bf16 · torch {torch.__version__}"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
