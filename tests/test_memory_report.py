"""The memory table for LoRA on a 16-, 8- and 4-bit base: what each column must show, on the CPU and the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from minipeft import kernels
from minipeft.memory_report import format_memory_table, main, memory_report
from minipeft.model import GPT, GPTConfig
from minipeft.quant import int8_nbytes, nf4_nbytes
from minipeft.tuners import LoraConfig

LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


def tokens(vocab_size, batch, seq):
    t = torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return t[:, :-1], t[:, 1:]


def test_quantized_bases_shrink_the_weights_and_nothing_else():
    """Weights fall 16 → 8 → 4 bits; the adapter, its gradients and AdamW's state are the same in every row; and
    what backward keeps is the same too: the quantized layers keep their codes (the model's own buffers), not a
    dense weight (one 64 × 256 weight alone would be 32 KiB in bf16)."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=64, block_size=32))
    rows = memory_report(base, LORA, *tokens(64, 2, 16))
    w16, w8, w4 = (r["weights"] for r in rows)
    assert [r["bits"] for r in rows] == [16, 8, 4] and w16 > w8 > w4
    shapes = 2 * [(192, 64), (64, 64), (256, 64), (64, 256)]  # (out, in): c_attn, c_proj, c_fc, mlp c_proj
    bf16 = sum(2 * o * i for o, i in shapes)
    assert w16 - w8 == bf16 - sum(int8_nbytes(o, i) for o, i in shapes)  # exactly the Linear weights' format
    assert w16 - w4 == bf16 - sum(nf4_nbytes(o * i, 64, double_quant=True) for o, i in shapes)
    for key in ("adapter", "gradients", "optimizer"):
        assert rows[0][key] == rows[1][key] == rows[2][key] > 0, key
    kept = [r["kept_for_backward"] for r in rows]
    assert max(kept) - min(kept) <= 2048, kept  # at most the shared NF4 tables (16 + 256 fp32 values)
    assert all(r["peak_mb"] >= 0 for r in rows)
    table = format_memory_table(rows, "CPU")
    assert table.splitlines()[0] == "CPU" and len(table.splitlines()) == 6 and " 4-bit " in table


def test_a_worker_row_is_json(tiny_base, capsys):
    """The module's worker mode (one row, in the process it runs in), on the cached tiny base."""
    assert main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--seq", "16", "--r", "2", "--steps", "1",
                 "--worker", "8"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bits"] == 8 and row["adapter"] > 0 and row["peak_mb"] >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peaks_on_gpu_fall_with_the_bits():
    """On the GPU the allocator's peak is exact: the 4-bit row peaks below the 16-bit row by (nearly) all that
    its weights save: one layer's dequantized weight at a time is the only transient it adds. The 8-bit row
    peaks below the 16-bit row too, by less: LLM.int8()'s int32 product and its fp32 rescale are transients
    of the widest layer's output size."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=8, n_head=16, n_embd=1024, vocab_size=50304, block_size=512))
    with kernels.use_backend("auto"):
        rows = memory_report(base, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"),
                             *tokens(50304, 4, 512), device="cuda")  # fmt: skip
    print(format_memory_table(rows, torch.cuda.get_device_name()))
    p16, p8, p4 = (r["peak_mb"] * 2**20 for r in rows)
    w16, w8, w4 = (r["weights"] for r in rows)
    assert p16 - p4 >= 0.9 * (w16 - w4), rows
    assert p8 < p16, rows
