"""benchmarks/compiled.py: the kernels compiled for an H100/H200 (sm_90a) on a machine without a GPU.

The parsing is checked on hand-written SASS; the whole script runs in a subprocess without TRITON_INTERPRET (the
interpreter, which the rest of the suite runs under on a CPU, replaces every kernel with a Python function that
has nothing to compile).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipeft.kernels import nf4_rows_gluon

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compiled.py"


@pytest.fixture(scope="module")
def compiled():
    """The script as a module (benchmarks/ is not a package); nothing here compiles a kernel. It refuses to load
    under the interpreter and sets MINIPEFT_KERNEL_AUTOTUNE: both variables are put back afterwards, and the
    kernels are imported first, so that the rest of the session keeps the interpreter's kernels."""
    import minipeft.kernels  # noqa: F401  (decorated now, under this session's TRITON_INTERPRET)

    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "MINIPEFT_KERNEL_AUTOTUNE")}
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location("compiled_script", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["compiled_script"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sass(lines: list[str], start: int = 0) -> str:
    """cuobjdump-like text: one instruction per 16 bytes, from address ``start``."""
    return "\n".join(f"        /*{start + 16 * i:04x}*/                   {op} ;" for i, op in enumerate(lines))


def test_the_work_loop_is_the_innermost_with_a_warpgroup_mma(compiled):
    """Not the side loop with the older MMA, not the outer loop, and not the shorter range that the retry stub
    after EXIT makes by jumping back to the HGMMA."""
    code = ["MOV R1, R2", "HMMA.16816.F32 R4, R8, R12, R4", "BRA 0x10",          # a side loop (0x10 → 0x20)
            "IADD3 R1, R1, 1",                                                     # 0x30: outer loop starts
            *["LDS R5, [R6]"] * 6,                                                 # 0x40: inner loop starts
            "HGMMA.64x128x16.F32 R24, gdesc[UR4], R24", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "BRA 0x40",  # 0xc0
            "ISETP.GE.AND P0, PT, R1, 8, PT", "BRA 0x30", "EXIT",                  # outer back-edge at 0xe0
            "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R0", "BRA 0xa0"]            # a retry stub after EXIT
    loop = compiled.work_loop(compiled.instructions(_sass(code)))
    assert [ins.opcode for ins in loop] == ["LDS"] * 6 + ["HGMMA.64x128x16.F32", "WARPGROUP.DEPBAR.LE", "BRA"]
    assert compiled.mma_in_flight(loop) == 1


def test_with_most_mma_the_work_loop_is_the_one_written_out_over_chunks(compiled):
    """A short side loop (two MMAs), the main loop over two chunks (two MMAs and its lookups) and its remainder
    loop (one chunk, one MMA): by default the shortest loop with an MMA, with ``most_mma`` the main loop."""
    hmma = "HMMA.16816.F32.BF16 R4, R8, R12, R4"
    code = [hmma, hmma, "BRA 0x0",                                                       # 0x00: side loop
            "PRMT R1, R2, 0x3210, R3", hmma, "PRMT R1, R2, 0x3210, R3", hmma, "BRA 0x30",  # 0x30: main loop
            "PRMT R1, R2, 0x3210, R3", hmma, "BRA 0x80", "EXIT"]                         # 0x80: remainder
    code = compiled.instructions(_sass(code))
    assert [ins.address for ins in compiled.work_loop(code)] == [0x00, 0x10, 0x20]
    assert [ins.address for ins in compiled.work_loop(code, most_mma=True)] == [0x30, 0x40, 0x50, 0x60, 0x70]


def test_without_an_mma_the_work_loop_is_the_longest_and_nothing_is_in_flight(compiled):
    code = ["FFMA R1, R2, R3, R1", "BRA 0x0", "SHFL.IDX R4, R5, R6, R7", "FFMA R1, R4, R3, R1",
            "LOP3.LUT R5, R5, 0xf, RZ, 0xc0, !PT", "BRA 0x20", "EXIT"]
    loop = compiled.work_loop(compiled.instructions(_sass(code)))
    assert [ins.opcode for ins in loop] == ["SHFL.IDX", "FFMA", "LOP3.LUT", "BRA"]
    assert compiled.mma_in_flight(loop) is None
    no_loop = compiled.instructions(_sass(["MOV R1, R2", "HMMA.16816.F32 R4, R8, R12, R4", "EXIT", "BRA 0x30"]))
    assert [ins.opcode for ins in compiled.work_loop(no_loop)] == ["MOV", "HMMA.16816.F32", "EXIT"]  # all of it


def test_the_gluon_merge_keeps_its_tile_out_of_shared_memory():
    """kernels/nf4_merge_gluon.py: Ŵ made in the MMA's layout, so of shared memory only A's and B's tiles on
    their way into the MMA's registers (a 64 × 64 fp32 tile of W' would take 16 KiB), and the codebook looked up
    by shuffles in the loop over a program's tiles."""
    run = _run("--kernels", "nf4_merge_4096")
    assert run.returncode == 0, run.stderr[-2000:]
    row = _rows(run.stdout)["nf4_merge_4096"]
    assert row["MMA"] == "HMMA" and int(row["smem KiB"]) <= 4 and 0 < int(row["regs"]) <= 255
    assert float(row["per weight"]) > 0 and "SHFL" in row["top"]


def test_the_register_operand_nf4_forward_compiles_with_this_triton():
    """kernels/nf4_rs_gluon.py (no GPU runs it here): Gluon's API moves between Triton versions (its TMA copy was
    renamed after 3.6), so the kernel is compiled for sm_90a by the Triton installed here. Its loop on HGMMA with
    Ŵ from registers, one group left in flight and not serialized, and no instruction writing the registers of an
    MMA that may still read them; its stages and table within an SM's 227 KiB."""
    run = _run("--kernels", "nf4_rs_4096")
    assert run.returncode == 0, run.stderr[-2000:]
    row = _rows(run.stdout)["nf4_rs_4096"]
    assert row["MMA"] == "HGMMA" and row["serialized"] == "no" and int(row["in flight"]) == 1
    assert row["A overwritten"] == "0" and 0 < int(row["smem KiB"]) <= 227


def test_a_register_operand_rewritten_under_a_running_mma_is_counted(compiled):
    """One set of registers for every step: the next step's F2FP writes R152 while the group that reads it is in
    flight (the wait leaves 1). With two sets, alternating, nothing is written under a running MMA."""
    one = ["LDS.64 R8, [R9]", "F2FP.BF16.F32.PACK_AB R152, R8, R9", "HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR8], "
           "R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "BRA 0x0"]
    loop = compiled.work_loop(compiled.instructions(_sass(one)))
    assert compiled.a_overwrites(loop) == 1
    two = ["F2FP.BF16.F32.PACK_AB R152, R8, R9", "HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR8], R24, gsb0",
           "WARPGROUP.DEPBAR.LE gsb0, 0x1", "LDS.128 R168, [R9]",
           "HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR8], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "BRA 0x0"]
    loop = compiled.work_loop(compiled.instructions(_sass(two)))
    assert compiled.a_overwrites(loop) == 0
    assert compiled.a_overwrites(compiled.work_loop(compiled.instructions(_sass(
        ["HGMMA.64x64x16.F32 R24, gdesc[UR4], R24", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "BRA 0x0"])))) is None


def test_in_flight_is_the_strictest_wait_and_a_predicated_exit_does_not_end_the_code(compiled):
    """Two waits in the loop, 1 then 0: the loop leaves nothing running at the second. The predicated EXIT
    before the back-edge is not where the out-of-line code starts."""
    code = ["HGMMA.64x64x16.F32 R24, gdesc[UR4], R24", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "HGMMA.64x64x16.F32 R24, gdesc[UR8], R24", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
            "@!P0 EXIT", "BRA 0x0", "BRA 0x60"]                 # the last EXIT is predicated; then padding
    loop = compiled.work_loop(compiled.instructions(_sass(code)))
    assert len(loop) == 6 and loop[4].predicate == "@!P0"
    assert compiled.mma_in_flight(loop) == 0


def test_addresses_past_64k_are_read(compiled):
    """cuobjdump prints five hex digits from 0x10000 on; a long kernel's loop lies there."""
    code = compiled.instructions(_sass(["HGMMA.64x64x16.F32 R24, gdesc[UR4], R24", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
                                        "BRA 0x10000", "EXIT"], start=0x10000))
    assert [ins.address for ins in code] == [0x10000, 0x10010, 0x10020, 0x10030]
    assert compiled.mma_in_flight(compiled.work_loop(code)) == 0


def test_arguments_are_specialized_as_a_launch_would(compiled):
    """Pointers aligned, 1 a constant, multiples of 16 divisible, bools u1, ints past 2**31 i64; a missing
    example value is named."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, n, stride, odd, big, scale, flag, BLOCK: tl.constexpr):
        pass

    launch = compiled.Launch("k", "", kernel, dict(x_ptr="*bf16", n=48, stride=1, odd=7, big=2**31, scale=0.5,
                                                   flag=True), dict(BLOCK=64), 4, 1)
    signature, constexprs, attrs = compiled.specialize(launch)
    assert signature == {"x_ptr": "*bf16", "n": "i32", "stride": "constexpr", "odd": "i32", "big": "i64",
                         "scale": "fp32", "flag": "u1", "BLOCK": "constexpr"}
    assert constexprs == {"BLOCK": 64, "stride": 1}
    assert set(attrs) == {(0,), (1,), (4,)}
    launch.args.pop("odd")
    with pytest.raises(ValueError, match="'odd' needs an example value"):
        compiled.specialize(launch)


def test_ptxas_remarks_are_kept_and_any_serialization_counts(compiled):
    """From a log as ptxas -v writes it: the performance remarks and real spills, not the zero-spill line; a
    serialization for too few registers (C7511) counts as much as one for the accumulators (C7515)."""
    log = """ptxas info    : 0 bytes gmem
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient \
register resources for the wgmma pipeline in the function 'k'
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    8 bytes stack frame, 8 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers"""
    notes = compiled.ptxas_notes(log)  # (the backslash above joins the C7511 remark into one line, as ptxas writes it)
    assert len(notes) == 2 and notes[0].startswith("(C7511)") and notes[1].startswith("8 bytes stack frame")
    launch = compiled.Launch("k", "", None, {}, {}, 4, 1)
    assert compiled.Report(launch, 168, 0, "HGMMA", 0, False, [], notes).serialized
    assert not compiled.Report(launch, 168, 0, "HGMMA", 0, False, [], notes[1:]).serialized


def test_per_weight_divides_the_loop_by_the_weights_a_thread_makes(compiled):
    """A loop of 256 instructions, 2 warps (64 threads), 512 weights per iteration: 8 weights a thread, 32
    instructions each."""
    launch = compiled.Launch("k", "", None, {}, {}, 2, 1, weights_per_iteration=512)
    loop = [compiled.Instruction(16 * i, "FFMA", "") for i in range(256)]
    report = compiled.Report(launch, 64, 0, "-", None, False, loop, [])
    assert report.per_weight == 32
    assert compiled.Report(compiled.Launch("k", "", None, {}, {}, 2, 1), 64, 0, "-", None, False, loop,
                           []).per_weight is None


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells, strict=True))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_real_kernels_compile_for_hopper_and_the_two_readings_of_serialization_agree():
    """The persistent TMA GEMM becomes Hopper's warpgroup MMA (HGMMA); the NF4 forward too; the decode kernel
    has none. Where ptxas says it serialized the MMAs, the SASS must wait for every one (0 in flight); the TMA
    GEMM's pipeline leaves at least one running."""
    run = _run("--kernels", "lora_forward,nf4_forward_4096,nf4_decode_1")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = _rows(run.stdout)
    assert set(rows) == {"lora_forward", "nf4_forward_4096", "nf4_decode_1"}
    for name in ("lora_forward", "nf4_forward_4096"):
        row = rows[name]
        assert row["MMA"] == "HGMMA" and 0 < int(row["regs"]) <= 255 and int(row["smem KiB"]) > 0
        assert int(row["loop"]) > 0
        if row["serialized"] == "yes":  # then its own note is printed, and the SASS waits for every MMA
            assert int(row["in flight"]) == 0 and f"{name}: ptxas: " in run.stdout
    assert rows["lora_forward"]["serialized"] == "no" and int(rows["lora_forward"]["in flight"]) >= 1
    # the NF4 forward tells the compiler that its loop runs (tl.assume): without it ptxas serializes its MMAs
    assert rows["nf4_forward_4096"]["serialized"] == "no" and int(rows["nf4_forward_4096"]["in flight"]) >= 1
    assert float(rows["nf4_forward_4096"]["per weight"]) > 0
    decode = rows["nf4_decode_1"]
    assert decode["MMA"] == "-" and decode["in flight"] == "-" and decode["serialized"] == "no"


def test_the_lora_passes_compile_for_hopper():
    """The shrink, dS/dB and dA passes, at c_attn's shape with the tiles and splits the library launches on an
    H200: each compiles for sm_90a to a loop with a tensor-core MMA (warpgroup or mma.sync: the compiler's choice)."""
    run = _run("--kernels", "lora_shrink,lora_dsdb,lora_da")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = _rows(run.stdout)
    assert set(rows) == {"lora_shrink", "lora_dsdb", "lora_da"}
    for row in rows.values():
        assert row["MMA"] in ("HGMMA", "HMMA") and int(row["loop"]) > 0 and 0 < int(row["regs"]) <= 255


def test_an_unknown_kernel_is_named():
    run = _run("--kernels", "lora_forward,nope")
    assert run.returncode == 2 and "unknown ['nope']" in run.stderr


def test_the_gluon_kernel_keeps_its_weight_operand_in_registers():
    """kernels/nf4_rows_gluon.py at 16 rows with double quantization: mma.sync (HMMA) whose loop touches shared
    memory only to look up its tables, one LDS a byte of codes and one a row and chunk for the absmax's codebook —
    the layout conversions it asserts trivial moved no data, and nothing is stored or waited for in the loop."""
    run = _run("--kernels", "nf4_rows_16")
    assert run.returncode == 0, run.stderr[-2000:]
    row = _rows(run.stdout)["nf4_rows_16"]
    g = nf4_rows_gluon
    bytes_a_thread = g.unroll_for(16) * 16 * g.WARPS * g.CHUNK // (32 * g.WARPS) // 2   # a loop step's codes
    lds = bytes_a_thread + g.unroll_for(16) * 2          # + each chunk's absmax for a thread's two rows
    assert row["MMA"] == "HMMA" and row["serialized"] == "no"
    assert int(row["loop smem"]) == lds and f"LDS {lds}" in row["top"]
    assert 0 < int(row["regs"]) <= 255 and float(row["per weight"]) > 0


def test_the_few_rows_kernel_reads_only_the_codebooks_before_the_kernel_before_it_is_done():
    """On Hopper the few-rows kernel is launched as the previous kernel's programmatic dependent, so its programs
    may start while that kernel still runs; before its ``griddepcontrol.wait`` (sm_90a PTX) it may only load from
    the codebooks, and only where the launch says they are constants (``TABLES_FIRST``: kernels/constants.py).
    Everything else — x, which the previous kernel may be writing, the codes, this kernel's own counters and
    partial sums of the launch before — waits. It lets the next launch in (``launch_dependents``) only after its
    own wait: a launch let in at its programs' start lets in the next, and so on, a chain of launches holding the
    SMs while they wait (slower, benchmarks/RESULTS.md). And at 1-8 rows, with the first step peeled, a barrier
    follows all of that step's loads before its first MMA (without it ptxas spreads the loads among the MMAs).
    Fails if an access moves before the wait, if the tables do not, if the next launch is let in before it, or
    if the peeled step's barrier goes."""
    code = (
        "import dataclasses, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('compiled_script', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['compiled_script'] = m; spec.loader.exec_module(m)\n"
        "launch = m._nf4_rows()\n"
        "names = list(m._jit_function(launch.kernel).arg_names)\n"
        "peeled = dict(BM=8, PEEL=True)\n"
        "for name, cx in (('16', {}), ('16-after', dict(TABLES_FIRST=False)), ('8-peeled', peeled)):\n"
        "    ptx = m.compile_for_hopper(dataclasses.replace(launch, constexprs={**launch.constexprs, **cx}))[0]\n"
        "    ptx = ptx.asm['ptx']\n"
        "    wait, trigger = ptx.find('griddepcontrol.wait'), ptx.find('griddepcontrol.launch_dependents')\n"
        "    found = m.global_accesses_before(ptx, 'griddepcontrol.wait')\n"
        "    read = sorted({(op.split('.')[0], names[int(p.rsplit('_', 1)[1])]) for op, ps in found for p in ps})\n"
        "    step = ptx[wait:ptx.find('mma.sync', wait)]  # from the wait to the first MMA\n"
        "    words = step.count('ld.global.v2.b32')  # 2 a chunk: the codes' words\n"
        "    barrier = words >= 8 and step.rfind('ld.global') < step.rfind('bar.sync')\n"
        "    print('variant', name, read, sum(not ps for _, ps in found), 0 <= wait < trigger, barrier)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("variant")]
    codebooks = "[('ld', 'dq_ptr'), ('ld', 'nf4_ptr')]"
    assert lines == [f"variant 16 {codebooks} 0 True False", "variant 16-after [] 0 True False",
                     f"variant 8-peeled {codebooks} 0 True True"], run.stdout[-2000:]
