"""What Triton compiles minipeft's kernels to for an H100/H200 (sm_90a), on any machine: no GPU needed.

Triton can compile for a GPU it is not running on: ``triton.compile(ASTSource(kernel, signature, ...),
target=GPUTarget("cuda", 90, 32))`` runs the same passes a launch runs (TTIR → TTGIR → LLVM IR → PTX) and
Triton's own ptxas makes the cubin; the cuobjdump shipped with Triton disassembles it to SASS, the instructions
the GPU executes. Each kernel below is compiled as a launch at the stated shape would specialize it (pointers
16-byte aligned, integer arguments equal to 1 made constants, multiples of 16 marked divisible), and the table
says, per kernel:

    regs        registers per thread (ptxas): with the shared memory, how many programs fit on one SM
    smem KiB    shared memory per program: the pipeline's stages of tiles, the layout conversions, and what a
                kernel declares in its own PTX (a lookup table)
    MMA         the matrix instruction in the work loop: HGMMA is Hopper's asynchronous warpgroup MMA (wgmma),
                HMMA the older synchronous mma.sync, "-" none (CUDA cores only)
    in flight   how many HGMMA groups the loop leaves running at its strictest wait: the smallest N of its SASS
                waits ``WARPGROUP.DEPBAR.LE gsb0, N`` (0: every iteration waits until all its MMAs are done;
                "no wait": the loop has HGMMA but waits for them elsewhere)
    A overwritten  for a loop whose HGMMA reads its first operand from registers: how many instructions write
                those registers while the MMA may still read them (``a_overwrites``; must be 0), "-" otherwise
    serialized  whether ptxas says "wgmma.mma_async instructions are serialized" (C7515, C7511, ...: it then waits
                for each MMA before the next instruction; the reason it gives is printed under the table)
    warp-spec.  whether the loop was warp-specialized (``ttg.warp_specialize`` in the TTGIR): a producer warp
                issues the TMA copies while the others compute, as cuBLAS's Hopper kernels do
    loop        SASS instructions in the loop that does the work (the innermost with a warpgroup MMA in it,
                else the longest) — one iteration, as one thread executes it
    loop smem   the loop's shared-memory instructions and barriers (LDS, STS, LDSM, STSM, BAR): 0 for a loop that
                keeps its operands in registers
    per weight  for the NF4 kernels: the loop's instructions per weight that one thread dequantizes
    top         the loop's most frequent opcodes

The tile is the kernel's own without autotuning (``MINIPEFT_KERNEL_AUTOTUNE=0``), or the autotune candidate
named beside it: a GPU's autotuner may pick another, whose code differs. The compiler's output depends on the
Triton version (this script prints it): benchmarks/RESULTS.md records a run with the version the H200 runs.

Static counts are not times: a loop of fewer instructions can still wait on memory. They say where a
kernel's instructions go and what the compiler did with the code as written; benchmarks/RESULTS.md has the
measured times (and uses this script's output as the profile of a design that compiles but cannot be timed here).

    python benchmarks/compiled.py                              # every kernel below (~30 s on 2 CPU cores)
    python benchmarks/compiled.py --kernels lora_forward --sass  # and the work loop's SASS, opcode by opcode
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import io
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("MINIPEFT_KERNEL_AUTOTUNE", "0")  # the kernels' fixed default tiles, no autotuner
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("benchmarks/compiled.py compiles for a GPU: run it without TRITON_INTERPRET (the interpreter replaces "
             "every @triton.jit kernel with a Python one, which has nothing to compile)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from minipeft.kernels import (  # noqa: E402
    lora_triton,
    nf4_decode_triton,
    nf4_lora_triton,
    nf4_merge_gluon,
    nf4_rows_gluon,
    nf4_rs_gluon,
)

HOPPER = GPUTarget("cuda", 90, 32)  # sm_90a (H100, H200), 32 threads a warp
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclasses.dataclass
class Launch:
    """One kernel as a launch compiles it: example arguments by name (a pointer as its Triton type, "*bf16"; a
    TMA descriptor as its Gluon type, ``tensordesc``; an int or float as its value), the meta-parameters, and how
    many weights one loop iteration dequantizes."""

    name: str
    shape: str
    kernel: object  # a @triton.jit function, or an autotuner around one
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    weights_per_iteration: int = 0  # per program; 0 where "per weight" means nothing (a bf16 GEMM)
    tile_note: str = ""             # where the tile comes from: the kernel's untuned default, or an autotune candidate
    most_mma: bool = False          # work_loop's choice for a loop written out over several chunks

    @property
    def tile(self) -> str:
        dims = [f"{k}={v}" for k, v in self.constexprs.items() if k in ("BM", "BN", "BK", "BW", "SPLIT_K")]
        note = f" ({self.tile_note})" if self.tile_note else ""
        return " ".join(dims) + f", {self.num_warps} warps, {self.num_stages} stages{note}"


def _scalar_type(value) -> tuple[str, bool]:
    """(Triton type or "constexpr", divisible by 16) for an int, float or bool argument, as Triton's launcher
    specializes it (its own function where this Triton has it; the same rules otherwise)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        return kind, key == "D"
    except ImportError:
        if type(value) is bool:
            return "u1", False
        if type(value) is float:
            return "fp32", False
        if value == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
        return kind, value % 16 == 0


def specialize(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, as Triton specializes a launch with these arguments:
    a pointer 16-byte aligned (torch's allocations are), an int equal to 1 a constant, a multiple of 16 marked
    divisible."""
    constexprs = dict(launch.constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(_python_function(launch.kernel)).parameters):
        value = launch.args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str) and value.startswith("tensordesc"):  # a TMA descriptor (its box and layout)
            signature[name] = value
        elif isinstance(value, str):  # a pointer, as its Triton type
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(value) in (int, float, bool):
            kind, divisible = _scalar_type(value)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
            elif divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{launch.name}: argument {name!r} needs an example value (a pointer type such as "
                             f"'*bf16', an int, a float or a bool), got {value!r}")
    return signature, constexprs, attrs


def _jit_function(kernel):
    """The @triton.jit function inside an autotuner (which keeps it in ``.fn``)."""
    while not isinstance(kernel, triton.runtime.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _python_function(kernel):
    """The kernel's Python function, whatever wraps it (a jit function, an autotuner, the interpreter)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def compile_for_hopper(launch: Launch):
    """(CompiledKernel, ptxas's log): the kernel (TTGIR, PTX and cubin in ``.asm``) that a launch of ``launch``
    on sm_90a builds, and what ptxas said while it made that cubin (``ptxas -v`` with Triton's own flags)."""
    fn = _jit_function(launch.kernel)
    signature, constexprs, attrs = specialize(launch)
    source_type = GluonASTSource if getattr(fn, "is_gluon", lambda: False)() else ASTSource  # a Gluon kernel's own
    source = source_type(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    knobs = triton.knobs
    log = io.StringIO()
    # compiled afresh (a cached cubin would skip ptxas), its log printed by Triton and captured here; the scopes
    # put the knobs (and the environment variables behind them) back afterwards
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
        compiled = triton.compile(source, target=HOPPER, options={"num_warps": launch.num_warps,
                                                                  "num_stages": launch.num_stages})
    if not re.search(r"Used \d+ registers", log.getvalue()):
        raise RuntimeError(f"{launch.name}: no ptxas log was captured (this Triton may print it elsewhere); "
                           f"got {log.getvalue()[:200]!r}")
    return compiled, log.getvalue()


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(_BIN, "cuobjdump")
    if not os.path.exists(tool):
        raise RuntimeError(f"{tool} not found: this Triton does not ship NVIDIA's binary tools")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


@dataclasses.dataclass
class Instruction:
    address: int
    opcode: str    # with its modifiers: "HGMMA.64x128x16.F32.BF16"
    operands: str
    predicate: str = ""  # "@P0", "@!P1", ... or "" when it always runs


def instructions(sass: str) -> list[Instruction]:
    """The SASS lines of cuobjdump's listing, in address order."""
    found = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*)", line)
        if m:
            found.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4), (m.group(2) or "").strip()))
    return found


def work_loop(code: list[Instruction], most_mma: bool = False) -> list[Instruction]:
    """The loop that does the work: the innermost loop with a warpgroup MMA in it, else the innermost with an
    MMA, else the longest loop. A loop runs from a backward branch's target to the branch; branches after the
    last EXIT that always runs are left out (ptxas puts out-of-line code there, such as the retry of a barrier
    wait, which jumps back into the loop it came from). ``most_mma``: of the loops with an MMA, the one with the
    most MMA instructions, the longer on a tie — for a kernel whose loop is written out over several chunks
    (its remainder loop, one chunk, is shorter) beside short loops of another program's work. A kernel without a
    loop (one tile a program) is all work: its code up to the last EXIT."""
    index = {ins.address: i for i, ins in enumerate(code)}
    last_exit = max((i for i, ins in enumerate(code) if ins.opcode == "EXIT" and not ins.predicate),
                    default=len(code))
    loops = []
    for i, ins in enumerate(code[:last_exit]):
        target = re.search(r"0x([0-9a-f]+)", ins.operands) if ins.opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < ins.address and int(target.group(1), 16) in index:
            loops.append(code[index[int(target.group(1), 16)]:i + 1])
    for mma in ("HGMMA", "HMMA"):  # a kernel's small side loops (S = x·Aᵀ, say) may use the older MMA
        with_mma = [body for body in loops if any(ins.opcode.startswith(mma) for ins in body)]
        if with_mma and most_mma:
            return max(with_mma, key=lambda body: (sum(ins.opcode.startswith(mma) for ins in body), len(body)))
        if with_mma:
            return min(with_mma, key=len)
    return max(loops, key=len, default=code[:last_exit + 1])  # no loop (a tile a program): all of the code


def mma_in_flight(loop: list[Instruction]) -> int | None:
    """How many warpgroup MMA groups the loop leaves running at its strictest wait: the smallest N of its waits
    ``WARPGROUP.DEPBAR.LE gsb0, N`` ("wait until at most N groups are pending"); None without a wait."""
    waits = [int(n, 16) for ins in loop if ins.opcode.startswith("WARPGROUP.DEPBAR")
             for n in re.findall(r"gsb0,\s*0x([0-9a-f]+)", ins.operands)]
    return min(waits) if waits else None


def _destinations(ins: Instruction) -> set[int]:
    """The registers an instruction writes, as far as its first operand says (R8 for one register, with .64 or
    .128 two or four from there); none for stores, predicates and uniform registers."""
    m = re.match(r"\s*R(\d+)\b", ins.operands)
    if not m or ins.opcode.startswith(("ST", "HGMMA", "RED", "ATOM")):
        return set()
    width = 4 if ".128" in ins.opcode else 2 if ".64" in ins.opcode else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def a_overwrites(loop: list[Instruction]) -> int | None:
    """For a loop whose HGMMA takes its first operand from registers (``HGMMA... R24, R152, gdesc[...]``): how many
    instructions write one of those registers while that MMA may still be reading them — after its issue and
    before the ``WARPGROUP.DEPBAR.LE gsb0, N`` that retires its group. (PTX leaves the registers to the program
    until ``wgmma.wait_group``; ptxas does not keep them, so a loop that rewrites the same registers each step
    feeds a running MMA new values.) None where no HGMMA reads registers. The loop is walked twice, so that the
    groups left in flight at its back-edge are known the second time, where the count is taken."""
    reads = [re.match(r"\s*R\d+,\s*R(\d+),", ins.operands) for ins in loop if ins.opcode.startswith("HGMMA")]
    if not any(reads):
        return None
    in_flight: list[set[int]] = []
    open_group: set[int] = set()
    count = 0
    for lap in (0, 1):
        for ins in loop:
            if ins.opcode.startswith("HGMMA"):
                m = re.match(r"\s*R\d+,\s*R(\d+),", ins.operands)
                if m:
                    open_group |= set(range(int(m.group(1)), int(m.group(1)) + 4))
                if "gsb0" in ins.operands:
                    in_flight.append(open_group)
                    open_group = set()
            elif ins.opcode.startswith("WARPGROUP.DEPBAR"):
                keep = int(re.search(r"gsb0,\s*0x([0-9a-f]+)", ins.operands).group(1), 16)
                in_flight = in_flight[len(in_flight) - keep:] if keep else []
            elif lap and _destinations(ins) & set().union(open_group, *in_flight):
                count += 1
    return count


def ptxas_notes(log: str) -> list[str]:
    """ptxas's remarks on performance in its log: "Potential Performance Loss" (C7515 and its kin: wgmma
    serialized, and why) and spills of registers to local memory."""
    return [line.split("info    : ", 1)[-1].strip() for line in log.splitlines()
            if "Performance" in line or re.search(r"\b[1-9]\d* bytes spill", line)]


_PTX_REGISTER = re.compile(r"%[a-z]+\d+")


def global_accesses_before(ptx: str, marker: str) -> list[tuple[str, set[str]]]:
    """Each access to global memory (load, store, atomic, reduction, asynchronous copy) in the PTX before the first
    line holding ``marker``: (its opcode, the kernel parameters its address is computed from). The code before a
    Hopper kernel's ``griddepcontrol.wait`` runs straight through, so every register there is traced back through
    the instructions that write it to the ``ld.param`` loads it starts from."""
    sources: dict[str, set[str]] = collections.defaultdict(set)   # a register -> the registers and params it reads
    accesses = []
    for line in ptx.splitlines():
        if marker in line:
            break
        code = re.sub(r"^@!?%p\d+\s+", "", line.split("//")[0].strip()).rstrip(";")
        opcode, _, operands = code.partition(" ")
        parts = [part.strip() for part in re.split(r",(?![^{]*})", operands)] if operands else []
        if re.match(r"(ld|st|atom|red|cp\.async)\.(global|bulk)", opcode):
            address = next(part for part in parts if part.startswith("["))
            accesses.append((opcode, set(_PTX_REGISTER.findall(address))))
        if not parts or opcode.startswith(("st.", "red.", "bar.", "cp.async")):
            continue
        written = _PTX_REGISTER.findall(parts[0])
        read = {r for part in parts[1:] for r in _PTX_REGISTER.findall(part)}
        param = re.search(r"\[(\w+_param_\d+)\]", operands) if opcode.startswith("ld.param") else None
        for register in written:
            sources[register] |= read | ({param.group(1)} if param else set())

    def params(registers: set[str]) -> set[str]:
        seen, todo, found = set(), list(registers), set()
        while todo:
            item = todo.pop()
            if item in seen:
                continue
            seen.add(item)
            for source in sources.get(item, ()):
                (found.add if "_param_" in source else todo.append)(source)
        return found

    return [(opcode, params(registers)) for opcode, registers in accesses]


@dataclasses.dataclass
class Report:
    launch: Launch
    regs: int
    smem: int
    mma: str
    in_flight: int | None
    warp_specialized: bool
    loop: list[Instruction]
    notes: list[str]
    a_overwritten: int | None = None

    @property
    def serialized(self) -> bool:
        """ptxas serialized the warpgroup MMAs (C7515 for accumulators written between them, C7511 for too few
        registers, ...): it then waits for each one itself."""
        return any("wgmma.mma_async instructions are serialized" in note for note in self.notes)

    @property
    def per_weight(self) -> float | None:
        if not self.launch.weights_per_iteration:
            return None
        threads = 32 * self.launch.num_warps
        return len(self.loop) / (self.launch.weights_per_iteration / threads)

    @property
    def loop_smem(self) -> int:
        return sum(ins.opcode.split(".")[0] in ("LDS", "STS", "LDSM", "STSM", "BAR") for ins in self.loop)

    def top(self, n: int = 6) -> str:
        counts = collections.Counter(ins.opcode.split(".")[0] for ins in self.loop)
        return ", ".join(f"{op} {c}" for op, c in counts.most_common(n))


def report(launch: Launch) -> Report:
    compiled, log = compile_for_hopper(launch)
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    regs = re.search(r"REG:(\d+)", usage)
    static = re.search(r"SHARED:(\d+)", usage)   # declared in the kernel's own PTX (a table), beside Triton's
    loop = work_loop(instructions(_cuobjdump(compiled.asm["cubin"], "-sass")), launch.most_mma)
    bases = {ins.opcode.split(".")[0] for ins in loop}
    return Report(launch, int(regs.group(1)) if regs else -1,
                  compiled.metadata.shared + (int(static.group(1)) if static else 0),
                  "HGMMA" if "HGMMA" in bases else "HMMA" if "HMMA" in bases else "-",
                  mma_in_flight(loop), "ttg.warp_specialize" in compiled.asm["ttgir"], loop, ptxas_notes(log),
                  a_overwrites(loop))


# --------------------------------------------------------------------------------------------------------
# The kernels, each at a shape where it does its real work.
# --------------------------------------------------------------------------------------------------------
def _lora_gemm(forward: bool) -> Launch:
    """The persistent TMA GEMM with the low-rank term in its epilogue, at GPT-2's c_attn (768 → 2304), 7936 rows:
    forward Y = x·Wᵀ + s·S·Bᵀ + bias, or dX = dY·W + s·G·A."""
    M, K, N, r = 7936, 768, 2304, 16
    if not forward:
        K, N = N, K  # dX: dY (M, 2304) · W (2304, 768)
    # as fused_gemm_tma passes them: S (M, r) and lora_B.t() forward, G (M, R_PAD) fp32 and lora_A for dX; the
    # absent mask's pointer and strides are the output's (lora_triton._operands)
    args = dict(p_ptr="*bf16", q_ptr="*bf16", l_ptr="*bf16" if forward else "*fp32", r_ptr="*bf16",
                mask_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", M=M, N=N, K=K, R=r,
                M_BUCKET=lora_triton._m_bucket(M), stride_pm=K, stride_qrow=K if forward else N, stride_lm=r,
                stride_lr=1, stride_rr=1 if forward else N, stride_rn=r if forward else 1, stride_mm=N,
                stride_mn=1, stride_om=N, stride_on=1, scaling=2.0)
    with _autotuning(False):  # the kernel's tile without autotuning; the autotuner may pick another
        config = lora_triton._tma_configs()[0]
    constexprs = dict(Q_NK=forward, HAS_LORA=True, HAS_MASK=False, HAS_BIAS=forward, R_PAD=r, PRECISION="ieee",
                      NUM_SMS=132, GROUP_M=8, **{k: v for k, v in config.kwargs.items() if k != "GROUP_M"})
    return Launch("lora_forward" if forward else "lora_dx",
                  f"{M} x {K} -> {N}, r {r}, bf16" + ("" if forward else " (dX)"),
                  lora_triton._fused_gemm_tma_kernel, args, constexprs, config.num_warps, config.num_stages,
                  tile_note="the untuned tile")


H200_SMS = 132  # the splits below are the ones the library makes on an H200 (``lora_triton._splits``)


def _lora_pass(name: str) -> Launch:
    """One of LoRA's thin passes at c_attn's shape (7936 rows, 768 → 2304, r = 16, bf16), with the tile the
    library launches on an H200: the shrink S = x·Aᵀ (64 rows a program, 128 columns, 4 stages: what
    ``_shrink_tiles`` picks there), dS/dB (one pass over dY: G, dB) and dA (one pass over x)."""
    M, K, N, r = 7936, 768, 2304, 16
    if name == "lora_shrink":
        args = dict(x_ptr="*bf16", mask_ptr="*bf16", a_ptr="*bf16", s_ptr="*bf16", M=M, K=K, R=r, stride_xm=K,
                    stride_xk=1, stride_mm=K, stride_mk=1, stride_ar=K, stride_ak=1, stride_sm=r, stride_sr=1)
        constexprs = dict(HAS_MASK=False, R_PAD=r, PRECISION="ieee", BM=64, BK=128)
        return Launch(name, f"{M} x {K}, r {r}, bf16 (S = x·Aᵀ)", lora_triton._shrink_kernel, args, constexprs, 4, 4)
    if name == "lora_dsdb":
        bm, bn = lora_triton.DSDB_BM, lora_triton.DSDB_BN
        n_split, per_split = lora_triton._splits(M, bm, triton.cdiv(N, bn), H200_SMS, lora_triton.DSDB_PER_SM)
        args = dict(dy_ptr="*bf16", b_ptr="*bf16", s_ptr="*bf16", g_ptr="*fp32", db_acc_ptr="*fp32",
                    dbias_acc_ptr="*fp32", count_ptr="*i32", db_ptr="*bf16", dbias_ptr="*bf16", M=M, N=N, R=r,
                    ROWS_PER_SPLIT=per_split, N_SPLIT=n_split, stride_dym=N, stride_dyn=1,
                    stride_bn=r, stride_br=1, stride_sm=r, stride_sr=1, stride_dbn=r, stride_dbr=1, scaling=2.0)
        constexprs = dict(HAS_BIAS_GRAD=False, R_PAD=r, PRECISION="ieee", BM=bm, BN=bn)  # LoRA: the bias is frozen
        return Launch(name, f"{M} x {N}, r {r}, bf16 (G and dB from dY)", lora_triton._dsdb_kernel, args,
                      constexprs, lora_triton.DSDB_WARPS, lora_triton.DSDB_STAGES)
    bm, bk = lora_triton.DA_BM, lora_triton.DA_BK
    n_split, per_split = lora_triton._splits(M, bm, triton.cdiv(K, bk), H200_SMS, lora_triton.DA_PER_SM)
    args = dict(g_ptr="*fp32", x_ptr="*bf16", mask_ptr="*bf16", da_acc_ptr="*fp32", count_ptr="*i32", da_ptr="*bf16",
                M=M, K=K, R=r, ROWS_PER_SPLIT=per_split, N_SPLIT=n_split, stride_xm=K, stride_xk=1,
                stride_mm=K, stride_mk=1, stride_dar=K, stride_dak=1, scaling=2.0)
    constexprs = dict(HAS_MASK=False, R_PAD=r, PRECISION="ieee", BM=bm, BK=bk)
    return Launch(name, f"{M} x {K}, r {r}, bf16 (dA from G and x)", lora_triton._da_kernel, args, constexprs,
                  lora_triton.DA_WARPS, 3)  # da launches with Triton's default of 3 stages


@contextlib.contextmanager
def _autotuning(on: bool):
    """The kernels' config lists as they are with autotuning on (the candidates) or off (the one untuned tile),
    whatever MINIPEFT_KERNEL_AUTOTUNE says: the lists read ``lora_triton.AUTOTUNE`` when called."""
    saved, lora_triton.AUTOTUNE = lora_triton.AUTOTUNE, on
    try:
        yield
    finally:
        lora_triton.AUTOTUNE = saved


def _nf4_tiles():
    """(the NF4 forward's tile without autotuning, the first of the autotuner's candidates with 16-row tiles)."""
    with _autotuning(False):
        untuned = nf4_lora_triton._forward_configs()[0]
    with _autotuning(True):
        candidates = nf4_lora_triton._forward_configs()
    return untuned, next(c for c in candidates if c.kwargs["BM"] == 16)


def _nf4_forward(M: int) -> Launch:
    """QLoRA's tensor-core forward at K = N = 4096, r = 16, bf16, blocksize 64 with double quantization: for
    many rows the kernel's untuned tile, for a few rows the first of the autotuner's 16-row candidates (K split
    over 8 programs, as ``_split_k`` chooses on an H200 at 16 rows)."""
    K = N = 4096
    r = 16
    few = M <= 16
    split = 8 if few else 1
    config = _nf4_tiles()[1 if few else 0]
    bn, bm, bk = (config.kwargs[k] for k in ("BN", "BM", "BK"))
    warps, stages = config.num_warps, config.num_stages
    args = dict(x_ptr="*bf16", words_ptr="*i32", absmax_ptr="*u8", absmax_scale_ptr="*fp32",
                absmax_offset_ptr="*fp32", nf4_ptr="*fp32", dq_ptr="*fp32", s_ptr="*bf16", a_ptr="*bf16",
                b_ptr="*bf16", bias_ptr="*bf16", out_ptr="*fp32" if split > 1 else "*bf16",
                s_part_ptr="*fp32" if split > 1 else "*bf16",  # unsplit, nf4_forward passes y there
                M=M, N=N, K=K, R=r, M_BUCKET=nf4_lora_triton._m_bucket(M), K_SPLIT=K // split, stride_xm=K,
                stride_xk=1, stride_sm=r, stride_sr=1, stride_ar=K, stride_ak=1, stride_bn=r, stride_br=1,
                stride_os=M * N if split > 1 else 0, stride_om=N, stride_on=1, scaling=2.0)
    constexprs = dict(BLOCKSIZE=64, DQ_BLOCKSIZE=256, DOUBLE_QUANT=True, SPLIT_K=split, HAS_LORA=True,
                      SHRINK_HERE=split > 1, HAS_BIAS=False, R_PAD=r, PRECISION="ieee", BN=bn, BM=bm, BK=bk,
                      GROUP_N=config.kwargs["GROUP_N"])
    return Launch(f"nf4_forward_{M}", f"{M} x {K} -> {N}, NF4 + LoRA r {r}, bf16", nf4_lora_triton._nf4_forward_kernel,
                  args, constexprs, warps, stages, weights_per_iteration=bn * bk,
                  tile_note="a few-row autotune candidate" if few else "the untuned tile")


def _nf4_decode() -> Launch:
    """The decode kernel for one row of x at K = N = 4096 (matrix-vector products on CUDA cores)."""
    M, K, N, r, bn, bw, split = 1, 4096, 4096, 16, 16, 32, 4
    args = dict(x_ptr="*bf16", words_ptr="*i32", absmax_ptr="*u8", absmax_scale_ptr="*fp32",
                absmax_offset_ptr="*fp32", nf4_ptr="*fp32", dq_ptr="*fp32", a_ptr="*bf16", b_ptr="*bf16",
                bias_ptr="*bf16", y_ptr="*bf16", s_ptr="*bf16", part_ptr="*fp32", s_part_ptr="*fp32",
                count_ptr="*i32", M=M, N=N, K=K, KW=K // 8, R=r, K_SPLIT=K // split, stride_xm=K, stride_xk=1,
                stride_ar=K, stride_ak=1, stride_bn=r, stride_br=1, stride_ym=N, stride_yn=1, stride_sm=r,
                stride_sr=1, scaling=2.0)
    constexprs = dict(BLOCKSIZE=64, DQ_BLOCKSIZE=256, DOUBLE_QUANT=True, SPLIT_K=split, HAS_LORA=True,
                      HAS_BIAS=False, R_PAD=r, BN=bn, BW=bw, EVEN_K=True, S_FIRST=True, FENCES=True)
    return Launch("nf4_decode_1", f"{M} x {K} -> {N}, NF4 + LoRA r {r}, bf16", nf4_decode_triton._nf4_decode_kernel,
                  args, constexprs, 1, 1, weights_per_iteration=bn * bw * 8)


def _nf4_rows() -> Launch:
    """The Gluon kernel for a few rows (kernels/nf4_rows_gluon.py) at 16 rows of x, K = N = 4096, its split, a
    rank-16 adapter (whose S is made by programs of their own: the work loop is the weight's), as Hopper launches
    it with minipeft's codebooks: a programmatic dependent that lets the next launch in early, its tables first."""
    M, K, N, r = 16, 4096, 4096, 16
    g = nf4_rows_gluon
    k_split = g.rows_split(N, K, 132)
    args = dict(x_ptr="*bf16", words_ptr="*i32", absmax_ptr="*u8", absmax_scale_ptr="*fp32",
                absmax_offset_ptr="*fp32", nf4_ptr="*fp32", dq_ptr="*fp32", a_ptr="*bf16", part_ptr="*fp32",
                s_part_ptr="*fp32", b_ptr="*bf16", bias_ptr="*bf16", y_ptr="*bf16", s_ptr="*bf16", count_ptr="*i32",
                M=M, N=N, K=K, R=r, K_SPLIT=k_split, stride_xm=K, stride_ar=K, stride_bn=r, stride_br=1,
                stride_sm=r, stride_sr=1, scaling=2.0)
    constexprs = dict(BM=16, WARPS_=g.WARPS, BLOCKSIZE=64, DQ_BLOCKSIZE=256, DOUBLE_QUANT=True, HAS_LORA=True,
                      HAS_BIAS=True, SPLITS=K // k_split, UNROLL=g.unroll_for(M), S_FIRST=True, T_PAD=256, PEEL=False,
                      S_PAD=K // k_split, PDL=True, TRIGGER=True, TABLES_FIRST=True)
    return Launch("nf4_rows_16", f"{M} x {K} -> {N}, NF4 + LoRA r {r}, bf16", g._nf4_rows_kernel, args, constexprs,
                  g.WARPS, 1, weights_per_iteration=g.unroll_for(M) * 16 * g.WARPS * g.CHUNK, most_mma=True)


def _nf4_merge() -> Launch:
    """The merged weight W' = Ŵ + scaling·B·A from the codes in the MMA's layout (kernels/nf4_merge_gluon.py) at
    4096 × 4096, rank 16: the loop over a program's tiles along a row."""
    N = K = 4096
    g = nf4_merge_gluon
    args = dict(words_ptr="*i32", absmax_ptr="*u8", absmax_scale_ptr="*fp32", absmax_offset_ptr="*fp32",
                nf4_ptr="*fp32", dq_ptr="*fp32", a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", N=N, K=K, R=16,
                stride_ar=K, stride_ak=1, stride_bn=16, stride_br=1, scaling=2.0)
    constexprs = dict(BLOCKSIZE=64, BLOCK_BITS=6, DQ_BLOCKSIZE=256, DQ_BITS=8, DOUBLE_QUANT=True, R_PAD=16, BK=g.BK,
                      TILES=g.tiles_for(N, K, g.BK, g.WARPS, 132), WARPS_=g.WARPS,
                      W_LAYOUT=g._word_layout(g.WARPS, g.BK // 8), OUT_LAYOUT=g._out_layout(g.WARPS, g.BK))
    return Launch("nf4_merge_4096", f"{N} x {K}, NF4 + LoRA r 16 -> bf16", g._nf4_merge_mma_kernel, args,
                  constexprs, g.WARPS, 1, weights_per_iteration=16 * g.WARPS * g.BK)


def _descriptor(dtype: str, block: list[int]) -> str:
    """A Gluon TMA descriptor's type, as ``TensorDescriptor.from_tensor`` with the default layout makes it."""
    gl_dtype = {"bf16": gl.bfloat16, "i32": gl.int32, "fp32": gl.float32}[dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return f"tensordesc<{dtype}[{block[0]}, {block[1]}],{layout}>"


def _nf4_rs() -> Launch:
    """The register-operand NF4 forward for many rows (kernels/nf4_rs_gluon.py) at 4096 × 4096, rank 16, bias; its
    loop makes Ŵ's tile of two steps (two sets of the MMA's registers) for 128 × 256 × 128 multiply-adds."""
    M = N = K = 4096
    g = nf4_rs_gluon
    args = dict(x_desc=_descriptor("bf16", [g.BM, 64]), words_desc=_descriptor("i32", [g.BN, 8]),
                absmax_desc=_descriptor("fp32", [1, g.BN]), y_desc=_descriptor("bf16", [g.BM, g.BN]),
                nf4_ptr="*fp32", s_ptr="*bf16", b_ptr="*bf16", bias_ptr="*bf16", y_ptr="*bf16", scaling=2.0, M=M,
                N=N, K=K, R=16)
    constexprs = dict(BM=g.BM, BN=g.BN, STAGES=g.STAGES, R_PAD=16, HAS_LORA=True, HAS_BIAS=True,
                      TMA_STORE=True, CL=g._code_layout(g.BN), AL=g._absmax_layout(g.BN))
    return Launch("nf4_rs_4096", f"{M} x {K} -> {N}, NF4 + LoRA r 16, bf16", g._nf4_rs_kernel, args, constexprs,
                  g.WARPS, 1, weights_per_iteration=2 * g.BN * 64)


LAUNCHES = {
    "lora_forward": lambda: _lora_gemm(True),
    "lora_dx": lambda: _lora_gemm(False),
    "lora_shrink": lambda: _lora_pass("lora_shrink"),
    "lora_dsdb": lambda: _lora_pass("lora_dsdb"),
    "lora_da": lambda: _lora_pass("lora_da"),
    "nf4_forward_4096": lambda: _nf4_forward(4096),
    "nf4_forward_16": lambda: _nf4_forward(16),
    "nf4_decode_1": _nf4_decode,
    "nf4_rows_16": _nf4_rows,
    "nf4_merge_4096": _nf4_merge,
    "nf4_rs_4096": _nf4_rs,
}


def table(reports: list[Report]) -> str:
    rows = ["| kernel | shape | tile | regs | smem KiB | MMA | in flight | A overwritten | serialized | warp-spec. "
            "| loop | loop smem | per weight | top |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        per_weight = "" if r.per_weight is None else f"{r.per_weight:.1f}"
        in_flight = str(r.in_flight) if r.in_flight is not None else "no wait" if r.mma == "HGMMA" else "-"
        rows.append(f"| {r.launch.name} | {r.launch.shape} | {r.launch.tile} | {r.regs} | {r.smem / 1024:.0f} | "
                    f"{r.mma} | {in_flight} | {'-' if r.a_overwritten is None else r.a_overwritten} | "
                    f"{'yes' if r.serialized else 'no'} | "
                    f"{'yes' if r.warp_specialized else 'no'} | {len(r.loop)} | {r.loop_smem} | {per_weight} | "
                    f"{r.top()} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(LAUNCHES), help=f"comma-separated, from {', '.join(LAUNCHES)}")
    parser.add_argument("--sass", action="store_true", help="print each work loop's opcodes too")
    args = parser.parse_args(argv)
    names = args.kernels.split(",")
    unknown = [n for n in names if n not in LAUNCHES]
    if unknown:
        parser.error(f"--kernels: unknown {unknown}; choose from {', '.join(LAUNCHES)}")
    print(f"triton {triton.__version__}, compiled for sm_90a on this machine (no GPU used)", flush=True)
    reports = [report(LAUNCHES[n]()) for n in names]
    print(table(reports))
    for r in reports:
        for note in r.notes:
            print(f"{r.launch.name}: ptxas: {note}")
    if args.sass:
        for r in reports:
            print(f"\n{r.launch.name}: {len(r.loop)} instructions\n  " + " ".join(ins.opcode for ins in r.loop))


if __name__ == "__main__":
    sys.exit(main())
