"""benchmarks/compiled.py: the kernels compiled for an H100/H200 (sm_90a) on a machine without a GPU.

The script runs in a subprocess without TRITON_INTERPRET: the interpreter, which the rest of the suite runs
under on a CPU, replaces every kernel with a Python function that has nothing to compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compiled.py"


def _loops_module():
    """The script's pure-text helpers, loaded from its file without its kernels (benchmarks/ is not a package)."""
    source = SCRIPT.read_text()
    start = source.index("def hottest_loop(")
    end = source.index("\n\n\n", start)
    namespace: dict = {}
    exec("import re\n" + source[start:end], namespace)  # noqa: S102  (the project's own file)
    return namespace["hottest_loop"]


def _sass(lines: list[str]) -> str:
    """cuobjdump-like text: one instruction per 16 bytes, from address 0."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(lines))


def test_hottest_loop_takes_the_innermost_loop_with_a_warpgroup_mma():
    hottest_loop = _loops_module()
    code = ["MOV R1, R2", "HMMA.16816.F32 R4, R8, R12, R4", "BRA 0x10",        # a side loop (0x10 → 0x20)
            "IADD3 R1, R1, 1",                                                   # 0x30: outer loop starts
            "LDS R5, [R6]", "HGMMA.64x128x16.F32 R24, gdesc[UR4], R24", "BRA 0x40",  # inner loop 0x40 → 0x60
            "ISETP.GE.AND P0, PT, R1, 8, PT", "BRA 0x30"]                      # outer loop back-edge
    loop = hottest_loop(_sass(code))
    assert loop == ["LDS", "HGMMA.64x128x16.F32", "BRA"]


def test_hottest_loop_without_an_mma_is_the_longest():
    hottest_loop = _loops_module()
    code = ["FFMA R1, R2, R3, R1", "BRA 0x0", "SHFL.IDX R4, R5, R6, R7", "FFMA R1, R4, R3, R1",
            "LOP3.LUT R5, R5, 0xf, RZ, 0xc0, !PT", "BRA 0x20", "EXIT"]
    assert hottest_loop(_sass(code)) == ["SHFL.IDX", "FFMA", "LOP3.LUT", "BRA"]
    assert hottest_loop(_sass(["MOV R1, R2", "EXIT"])) == []


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells, strict=True))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_the_lora_gemm_and_the_decode_kernel_compile_for_hopper():
    """The persistent TMA GEMM must become Hopper's asynchronous warpgroup MMA (HGMMA), pipelined (an MMA
    still in flight at its wait); the decode kernel has no MMA, and its loop's instructions per weight are
    counted."""
    run = _run("--kernels", "lora_forward,nf4_decode_1")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = _rows(run.stdout)
    assert set(rows) == {"lora_forward", "nf4_decode_1"}
    gemm, decode = rows["lora_forward"], rows["nf4_decode_1"]
    assert gemm["MMA"] == "HGMMA" and int(gemm["in flight"]) >= 1
    assert 0 < int(gemm["regs"]) <= 255 and int(gemm["smem KiB"]) > 0
    assert int(gemm["loop"]) > 0
    assert gemm["warp-spec."] in ("yes", "no") and gemm["per weight"] == ""
    assert decode["MMA"] == "-" and decode["in flight"] == "-"
    assert float(decode["per weight"]) == pytest.approx(int(decode["loop"]) / (16 * 32 * 8 / 32), rel=0.01)


def test_an_unknown_kernel_is_named():
    run = _run("--kernels", "lora_forward,nope")
    assert run.returncode == 2 and "unknown ['nope']" in run.stderr
