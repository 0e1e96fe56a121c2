"""NF4: 4-bit NormalFloat quantization with double quantization, bit-exact with bitsandbytes' CPU path.

Weights are cut into blocks of ``blocksize`` values; each block is divided by its absolute maximum and every
value is replaced by the index of the nearest of 16 levels placed at quantiles of a normal distribution.
Double quantization then stores those absmax values themselves in 8 bits (blocks of 256, signed dynamic map).

    absmax_b = max_{i∈b} |w_i|,   code_i = argmin_k |w_i / absmax_b − NF4[k]|,   ŵ_i = NF4[code_i] · absmax_b

QLoRA, Dettmers et al. 2023: https://arxiv.org/abs/2305.14314 (NF4 in section 3, double quantization too).

Bits per parameter, for blocksize 64: 4 + 32/64 = 4.5 without double quantization;
4 + 8/64 + 32/(64·256) ≈ 4.127 with it. ``NF4Weight.bits_per_parameter()`` measures it from the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from minipeft import kernels
from minipeft.kernels.constants import constant
from minipeft.kernels.limits import NF4_BLOCKSIZES

__all__ = [
    "NF4_CODEBOOK",
    "NF4_VALUES",
    "NF4_OFFSET",
    "SIGNED_DYNAMIC_MAP",
    "DQ_BLOCKSIZE",
    "NF4Weight",
    "nf4_codebook_from_quantiles",
    "signed_dynamic_map",
    "quantize_nf4",
    "dequantize_nf4",
    "kernel_arguments",
    "nf4_nbytes",
]

# The 16 NF4 levels, as printed in the QLoRA paper's appendix and used by bitsandbytes (fp32 values).
# Index 7 is exactly 0; there are 7 negative and 8 positive levels, so 0 and ±1 are all representable.
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_CODEBOOK: torch.Tensor = torch.tensor(NF4_VALUES, dtype=torch.float32)  # (16,)

# The outermost probability of the quantile grid: 1 − (1/30 + 1/32)/2 ≈ 0.9677083. Using p = 1 would put
# the extreme level at infinity; this choice (from QLoRA's reference code) keeps it finite.
NF4_OFFSET: float = 0.9677083

DQ_BLOCKSIZE: int = 256  # absmax values per double-quantization block (fixed in QLoRA and bitsandbytes)

_VALID_BLOCKSIZES = NF4_BLOCKSIZES  # 32, 64, ..., 4096: what the kernels' tiles take (kernels/limits.py)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def nf4_codebook_from_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Recompute the 16 NF4 levels from quantiles of N(0, 1); returns a sorted ``(16,)`` fp32 tensor.

    NF4 gives each level an equal share of a normal distribution's probability mass. To have an exact 0,
    the positive and negative halves are built separately:
    8 positive levels are the normal quantiles Φ⁻¹(p) at 9 evenly spaced p from ``offset`` down to 0.5
    (dropping 0.5 itself), 7 negative levels mirror 8 evenly spaced p the same way, plus 0; then everything
    is divided by the largest value so the levels span [-1, 1]. The probabilities are spaced in fp32, the
    quantiles taken in fp64 and the result normalised in fp32, which reproduces ``NF4_CODEBOOK`` exactly.
    """
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # (8,) from offset towards 0.5
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]  # (7,)
    positive = torch.special.ndtri(p_pos.double())  # (8,) Φ⁻¹(p)
    negative = -torch.special.ndtri(p_neg.double())  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    levels = levels.sort().values
    return levels / levels.max()


def signed_dynamic_map() -> torch.Tensor:
    """The signed dynamic 8-bit map that bitsandbytes uses for double quantization; ``(256,)`` fp32, sorted.

    Dettmers 2015 (https://arxiv.org/abs/1511.04561): a sign, a run of zeros that works as an exponent
    (decades 1e-6 ... 1e0), and the remaining bits as a linear fraction. Decade ``10^(e-6)`` (e = 0..6) gets
    ``2^e`` levels: the midpoints of ``2^e`` equal steps of [0.1, 1] scaled by the decade, on both signs.
    That is 2·(1 + 2 + ... + 64) = 254 levels, plus 0 and 1.0 (so the map spans [-0.99297, 1]).
    """
    levels = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)  # (2^e + 1,)
        midpoints = (edges[:-1] + edges[1:]) / 2.0  # (2^e,)
        decade = 10 ** (e - 6) * midpoints
        levels += decade.tolist() + (-decade).tolist()
    return torch.tensor(sorted(levels), dtype=torch.float32)


SIGNED_DYNAMIC_MAP: torch.Tensor = signed_dynamic_map()  # (256,)

# Decision boundaries: a value goes to level k+1 only if it is strictly above the midpoint of levels k and
# k+1 (torch.bucketize with right=False); an exact tie goes to the lower level, as in bitsandbytes.
_NF4_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2  # (15,)
_DQ_MIDPOINTS = (SIGNED_DYNAMIC_MAP[:-1] + SIGNED_DYNAMIC_MAP[1:]) / 2  # (255,)


@dataclass(eq=False)
class NF4Weight:
    """A quantized weight: plain tensors mirroring bitsandbytes' ``QuantState`` field by field.

    ``codes``: ``((numel + 1) // 2,)`` uint8, element 2i in the high nibble (bnb: the packed tensor).
    ``shape``, ``dtype``: the original weight's (bnb: ``shape``, ``dtype``). ``blocksize``: values per absmax.
    Without double quantization ``absmax`` is ``(n_blocks,)`` fp32 (bnb: ``absmax``). With it,
    ``absmax_codes`` ``(n_blocks,)`` uint8 (bnb: ``absmax``), ``absmax_scale`` ``(ceil(n_blocks / 256),)``
    fp32 (bnb: ``state2.absmax``) and ``absmax_offset``, the subtracted mean, a 0-dim fp32 tensor (bnb:
    ``offset``; a tensor rather than a Python float so that it moves with ``.to`` and lives in a state_dict).
    """

    codes: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    dq_blocksize: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state tensors by field name (only those present)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes held by the state tensors (the shared codebooks are not counted: one copy serves all)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_parameter(self) -> float:
        """Storage per weight from the tensors' sizes: ≈4.127 with double quant, 4.5 without (bs 64)."""
        return 8 * self.nbytes() / self.numel

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on ``device``; dtypes are kept (the packed state must never be cast). The copy is checked
        (``_check_nf4_weight``, values included) before it is returned: on a GPU, dequantize_nf4 checks only
        the layout."""
        _check_nf4_weight(self, values=False)
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        _codebooks(moved["codes"].device)  # have the tables ready on that device for dequantize_nf4
        q = NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                      dq_blocksize=self.dq_blocksize, **moved)  # fmt: skip
        _check_nf4_weight(q, values=True)
        return q


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes ``quantize_nf4`` produces for ``numel`` weights, without building them (for size reports)."""
    _check_count(numel, "numel")
    _check_blocksize(blocksize)
    _check_double_quant_flag(double_quant)
    n_blocks = -(-numel // blocksize)
    codes = (numel + 1) // 2
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * -(-n_blocks // DQ_BLOCKSIZE) + 4


def _check_weight(w: torch.Tensor, name: str = "w") -> None:
    """Type, dtype and size of a weight to quantize (metadata only; its values are checked via the absmax)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {w.dtype} (convert it first: .float())")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); there is nothing to quantize")


def _check_count(value: int, name: str) -> None:
    """A size (a number of weights, rows or columns): an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")


def _check_bias(bias: torch.Tensor | None, name: str) -> None:
    """A Linear's bias, which a quantized layer keeps as it is: finite (one NaN would make its output NaN)."""
    if bias is not None and not torch.isfinite(bias.detach()).all():
        n_bad = int((~torch.isfinite(bias.detach())).sum())
        raise ValueError(f"{name} contains NaN or inf ({n_bad} of {bias.numel()} values); the quantized layer would "
                         "keep it and compute NaN")


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two from 32 to 4096, got {blocksize!r}")


def _check_double_quant_flag(double_quant: bool, name: str = "double_quant") -> None:
    if not isinstance(double_quant, bool):  # "no" is truthy: the intent of a string or an int is unclear
        raise TypeError(f"{name} must be True or False, got {type(double_quant).__name__} {double_quant!r}")


def _blocks_and_absmax(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` in fp32 as zero-padded blocks ``(n_blocks, blocksize)``, and each block's absmax ``(n_blocks,)``.

    The padding zeros leave the absmax unchanged. bitsandbytes' CPU path stores the absmax of a trailing
    partial block clamped to 1e-38 (see quantize_nf4); mirrored here so the statistics stay bit-identical.
    """
    flat = w.detach().reshape(-1).float()  # (n,) logical order; bnb also computes in fp32
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    if n % blocksize:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    return blocks, absmax


def _check_finite(absmax: torch.Tensor, w: torch.Tensor, name: str) -> None:
    """Refuse a ``w`` holding NaN or ±inf. A block's absmax is NaN or inf exactly when the block holds one
    (amax propagates NaN), so checking the n / blocksize absmax values checks all n weights."""
    if torch.isfinite(absmax).all():
        return
    bad = (~torch.isfinite(w.detach())).nonzero()  # (n_bad, w.ndim), only on the way to an error
    first = tuple(bad[0].tolist())
    raise ValueError(f"{name} contains NaN or inf ({len(bad)} of {w.numel()} values, the first at index {first}); "
                     "NF4 needs finite weights (a NaN poisons its block's absmax)")  # fmt: skip


def _quantize_absmax_8bit(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, ...]:
    """Blockwise 8-bit quantization with the signed dynamic map, as bitsandbytes' CPU path does it.

    x: ``(n,)`` fp32 → codes ``(n,)`` uint8, scale ``(ceil(n / blocksize),)`` fp32 (the block's absmax).
    bitsandbytes' CPU kernel uses a lookup table: it first snaps the normalised value v ∈ [-1, 1] to a grid
    of 65,536 points, ``g = floor((v + 1)/2 · 65535 + 1/2)``, then takes the level nearest to that grid point.
    We do the same arithmetic so the codes are bit-identical. (Its CUDA kernel takes the level nearest to v
    itself; the two differ by one level for ~0.1% of values that sit within 1/65535 of a boundary.)
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # zeros: absmax unchanged
    scale = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = (blocks * (1.0 / scale)[:, None]).clamp(-1.0, 1.0)  # NaN where scale == 0, fixed below
    grid = torch.floor((normed + 1.0) * 0.5 * 65535.0 + 0.5)  # (n_blocks, blocksize) integers 0..65535
    snapped = grid / 65535.0 * 2.0 - 1.0
    codes = torch.bucketize(snapped, _DQ_MIDPOINTS.to(x.device)).to(torch.uint8)
    # A block whose values are all 0 has scale 0: bitsandbytes gets 0·(1/0) = NaN there and stores code 0.
    # Any code decodes to the exact offset when the scale is 0; we store 0 too, explicitly.
    codes = torch.where((scale == 0)[:, None], torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], scale


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre the absmax values on their mean, then 8 bits each, 256 per block: (codes, scale, offset)."""
    offset = absmax.mean()  # 0-dim fp32
    codes, scale = _quantize_absmax_8bit(absmax - offset, DQ_BLOCKSIZE)
    return codes, scale, offset


def _check_double_quant(absmax: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                        dtype: torch.dtype, name: str) -> None:  # fmt: skip
    """Refuse double-quantized statistics that decode to inf (dequantize_nf4 would return inf or NaN).

    Two ways it happens, both with finite weights. (1) ``absmax.mean()`` sums in fp32: four blocks of
    |w| = 1e38 already sum past fp32's 3.4e38, so the offset is inf and so is every decoded absmax (this is
    where it overflows; each absmax and each value scaled by it stay finite). (2) The 8-bit map rounds a value
    up by up to ~0.7% of its block's scale, so an absmax near the top of ``dtype``'s range can decode past
    it: fp16 weights of 65504 in 8 blocks out of 12 (the rest 0) come back as 65538, inf in fp16. We decode
    exactly as dequantize_nf4 does (``absmax = map[code] · scale + offset``, n / blocksize values) and look.
    """
    decoded = _codebooks(codes.device)[1][codes.long()] * scale.repeat_interleave(DQ_BLOCKSIZE)[: codes.numel()]
    decoded = decoded + offset  # (n_blocks,) fp32, as nf4_dequantize_reference computes it
    if torch.isfinite(decoded.to(dtype)).all():
        return
    largest = absmax.max().item()
    if not torch.isfinite(offset):
        why = (f"their mean overflows float32 (the sum of {absmax.numel()} absmax values as large as "
               f"{largest:.3g} passes {torch.finfo(torch.float32).max:.3g})")  # fmt: skip
    else:
        why = (
            f"one decodes from its 8-bit code to {decoded.max().item():.6g} (the largest is {largest:.6g}), "
            f"beyond {dtype}'s largest value {torch.finfo(dtype).max:.6g}"
        )
    raise ValueError(f"{name}: double quantization cannot represent these absmax values: {why}; "
                     "use double_quant=False, which keeps the absmax values exactly in float32")  # fmt: skip


def _check_quantizable(w: torch.Tensor, blocksize: int, double_quant: bool, name: str = "w") -> None:
    """Everything ``quantize_nf4`` would refuse, found without quantizing (one pass for the absmax): for
    callers that must check several weights before changing anything (``quantize_model``)."""
    _check_weight(w, name)
    _check_blocksize(blocksize)
    _check_double_quant_flag(double_quant)
    _, absmax = _blocks_and_absmax(w, blocksize)
    _check_finite(absmax, w, name)
    if double_quant:
        _check_double_quant(absmax, *_double_quantize(absmax), w.dtype, name)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *, name: str = "w") -> NF4Weight:
    """Quantize ``w`` (any shape, fp32/bf16/fp16) to NF4, bit-identical with bitsandbytes' CPU path.

    Args:
        w: the weight. Any layout: it is read in logical (row-major) order, so a transposed or otherwise
            non-contiguous tensor gives the same result as its ``.contiguous()`` copy.
        blocksize: values per absmax, a power of two from 32 to 4096. The last block may be partial.
        double_quant: also quantize the absmax values (8 bits per block + an fp32 scale per 256 blocks).
        name: what the error messages call ``w`` (``NF4Linear.from_linear`` says ``linear.weight``).

    Returns:
        an ``NF4Weight`` on ``w``'s device.

    Raises:
        TypeError: ``w`` is not a tensor; ``double_quant`` is not a bool.
        ValueError: ``w`` has NaN/inf, is empty or not float16/bfloat16/float32; bad ``blocksize``; with
            ``double_quant``, absmax values whose double quantization would decode to inf (|w| ≈ 1e38 in
            many blocks; fp16 weights near 65504): ``double_quant=False`` stores those exactly.
    """
    _check_weight(w, name)
    _check_blocksize(blocksize)
    _check_double_quant_flag(double_quant)
    n = w.numel()

    # 1. one absmax per block, and every value scaled into [-1, 1] by it
    blocks, absmax = _blocks_and_absmax(w, blocksize)  # (n_blocks, blocksize) fp32, (n_blocks,)
    _check_finite(absmax, w, name)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]  # an all-zero block stays 0
    if n % blocksize:
        # bitsandbytes' CPU path treats a trailing partial block apart: it stores its absmax clamped to
        # 1e-38 (done in _blocks_and_absmax) and divides by it instead of multiplying by the reciprocal (a
        # 1-ulp difference at most). Mirrored here so the codes and statistics stay bit-identical.
        scaled[-1] = blocks[-1] / absmax[-1]
    scaled = scaled.clamp(-1.0, 1.0).reshape(-1)[: 2 * ((n + 1) // 2)]  # an odd n keeps one 0 of padding

    # 2. the nearest NF4 level; a tie goes to the lower level (strict `x > midpoint` goes up)
    idx = torch.bucketize(scaled, _NF4_MIDPOINTS.to(w.device)).to(torch.uint8)  # (2 * n_bytes,) in 0..15

    # 3. two codes per byte: element 2i in the high nibble, 2i+1 in the low one
    codes = (idx[0::2] << 4) | idx[1::2]  # (n_bytes,) uint8

    q = NF4Weight(codes=codes, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    _codebooks(codes.device)  # have the tables ready on this device for dequantize_nf4
    if not double_quant:
        q.absmax = absmax
        return q
    # 4. double quantization: centre the absmax values on their mean, then 8 bits each, 256 per block
    q.absmax_codes, q.absmax_scale, q.absmax_offset = _double_quantize(absmax)
    _check_double_quant(absmax, q.absmax_codes, q.absmax_scale, q.absmax_offset, w.dtype, name)
    return q


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _codebooks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 and dynamic-map tables on ``device``, made once per device.

    Cached so that a CUDA call copies nothing from the host (a copy would also stop CUDA-graph capture).
    ``quantize_nf4`` and ``NF4Weight.to`` fill the cache, so a compiled ``dequantize_nf4`` finds the tables
    there and treats them as graph inputs. No kernel writes them: marked so (kernels/constants.py), a kernel
    may read them before the kernel launched before it has finished.
    """
    tables = _TABLES.get(device)
    if tables is None:
        tables = _TABLES[device] = (constant(NF4_CODEBOOK.to(device)), constant(SIGNED_DYNAMIC_MAP.to(device)))
    return tables


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DQ_FIELDS = ("absmax_codes", "absmax_scale", "absmax_offset")
_STATISTICS = ("absmax", "absmax_scale", "absmax_offset")  # the fp32 fields: finite and ≥ 0 by construction


def _check_out_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16 (or None: q.dtype), got {dtype!r}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}: a dequantized "
                         "weight holds fractions that an integer dtype would truncate")  # fmt: skip


def _state_layout(
    numel: int, blocksize: int, double_quant: bool, dq_blocksize: int = DQ_BLOCKSIZE
) -> dict[str, tuple[torch.dtype, tuple[int, ...], str]]:
    """The state tensors of ``numel`` weights, by field name: (dtype, shape, why that shape). What
    ``quantize_nf4`` makes, written down once for what checks a state (``_check_nf4_weight``, NF4Linear's
    loading) or allocates one (``NF4Linear``)."""
    n_blocks = -(-numel // blocksize)
    layout = {"codes": (torch.uint8, ((numel + 1) // 2,), f"two 4-bit codes per byte for {numel} values")}
    if not double_quant:
        layout["absmax"] = (torch.float32, (n_blocks,), f"one per block of {blocksize} of {numel} values")
        return layout
    layout["absmax_codes"] = (torch.uint8, (n_blocks,), f"one per block of {blocksize} of {numel} values")
    layout["absmax_scale"] = (torch.float32, (-(-n_blocks // dq_blocksize),),
                              f"one per {dq_blocksize} of {n_blocks} blocks")  # fmt: skip
    layout["absmax_offset"] = (torch.float32, (), "one mean")
    return layout


def _check_nf4_weight(q: NF4Weight, values: bool | None = None) -> None:
    """Refuse an ``NF4Weight`` whose fields disagree with what its ``shape`` and ``blocksize`` imply.

    Every field: its type, then each tensor's dtype, length and device (metadata only, free), then, outside
    torch.compile, the fp32 statistics' values: finite and ≥ 0, as ``quantize_nf4`` makes them. Those are
    ~1/64 of the weight's size, but looking at them is a host sync, so by default (``values=None``) only a
    state on the CPU has its values checked; ``values=True`` checks them anywhere, ``False`` never. (A
    compiled graph takes them as inputs and cannot look.) The codes need no value check: every 4-bit and
    8-bit pattern indexes its table.

    Raises:
        TypeError: ``q`` is not an NF4Weight, or a field has the wrong Python type.
        ValueError: a field's value, dtype, length or device is wrong.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight (from quantize_nf4), got {type(q).__name__}")
    if not isinstance(q.shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in q.shape):
        raise TypeError(f"q.shape must be a torch.Size, got {q.shape!r}")
    if any(d <= 0 for d in q.shape):
        raise ValueError(f"q.shape must have positive sizes (an empty weight is never quantized), got {q.shape}")
    if not isinstance(q.dtype, torch.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q.dtype (the original weight's) must be float32, bfloat16 or float16, got {q.dtype!r}")
    _check_blocksize(q.blocksize, "q.blocksize")
    dq_blocksize = q.dq_blocksize
    if isinstance(dq_blocksize, bool) or not isinstance(dq_blocksize, int) or dq_blocksize <= 0:
        raise ValueError(f"q.dq_blocksize must be a positive int ({DQ_BLOCKSIZE} in QLoRA), got {dq_blocksize!r}")

    held = [name for name in ("absmax", *_DQ_FIELDS) if getattr(q, name) is not None]
    if held not in (["absmax"], list(_DQ_FIELDS)):
        raise ValueError(f"q holds {held or 'no statistics'}; an NF4Weight holds either absmax (plain) or all of "
                         "absmax_codes, absmax_scale and absmax_offset (double quantization)")  # fmt: skip

    expected = _state_layout(q.numel, q.blocksize, q.double_quant, dq_blocksize)
    for name, (dtype, shape, why) in expected.items():
        t = getattr(q, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"q.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.shape != shape:
            raise ValueError(f"q.{name} must be {dtype} of shape {shape} ({why}), got {t.dtype} of shape "
                             f"{tuple(t.shape)}")  # fmt: skip
        if t.device != q.codes.device:
            raise ValueError(
                f"q.{name} is on {t.device} but q.codes is on {q.codes.device}; move them together: q.to(device)"
            )

    if values is None:
        values = q.codes.device.type == "cpu"
    if not values or torch.compiler.is_compiling():
        return
    _check_statistics({f"q.{name}": getattr(q, name) for name in _STATISTICS if getattr(q, name) is not None})


def _check_statistics(stats: dict[str, torch.Tensor]) -> None:
    """Refuse fp32 statistics (``absmax``, ``absmax_scale``, ``absmax_offset``, by name) that are NaN, inf or
    negative: each is a maximum or a mean of absolute values. One host sync for all of them. Meta tensors
    (shapes without values) pass."""
    stats = {name: t for name, t in stats.items() if t.device.type != "meta"}
    good = [(torch.isfinite(t) & (t >= 0)).all() for t in stats.values()]
    if not good or bool(torch.stack(good).all()):
        return
    for (name, t), ok in zip(stats.items(), good, strict=True):
        if not ok:
            raise ValueError(f"{name} must be finite and ≥ 0 (a maximum or a mean of |w|), got "
                             f"{int(t.isnan().sum())} NaN, {int(t.isinf().sum())} inf and {int((t < 0).sum())} "
                             f"negative of {t.numel()} values")  # fmt: skip


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """ŵ = NF4[code] · absmax, with the absmax first decoded if it was double-quantized.

    Returns a tensor of ``q.shape`` in ``dtype`` (default: the original ``q.dtype``), computed in fp32 and
    rounded once, so it equals bitsandbytes' ``dequantize_4bit`` of the same state. It runs on the kernel
    switch (``kernels.nf4_dequantize``): ``backend`` is "reference" | "triton" | "auto" | None, with the
    precedence of ``kernels.lora_linear``; the math is in ``kernels/nf4_reference.py``, the Triton kernel in
    ``kernels/nf4_triton.py``. On the reference, ``torch.compile(dequantize_nf4, fullgraph=True)`` works and
    makes one kernel; the Triton kernel is one custom-op node there.

    Raises:
        TypeError, ValueError: ``q`` is not a consistent NF4Weight (``_check_nf4_weight`` lists what is
            checked); ``dtype`` is not float32, bfloat16, float16 or float64; an unknown backend, or an
            explicit "triton" that cannot run here.
    """
    # The layout is checked always (free). The statistics' values only on the CPU: looking at them on a GPU
    # is a host sync that stalls its queue, which made eager dequantization of a 4096 x 4096 weight 1.8x
    # slower (259 -> 457 us per call back to back; one H200, torch 2.11.0+cu130, 2026-12-02). A state on a
    # GPU had its values checked on the way there: quantize_nf4 makes them finite, NF4Weight.to and
    # NF4Linear's load_state_dict look at them.
    _check_nf4_weight(q)
    if dtype is not None:
        _check_out_dtype(dtype)
    return _dequantize(q, q.dtype if dtype is None else dtype, backend)


def kernel_arguments(q: NF4Weight) -> tuple[torch.Tensor | None, ...]:
    """The state as the kernels take it: (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values).

    ``absmax`` is the fp32 absmax, or with double quantization its 8-bit codes; the tables come from the
    per-device cache (``_codebooks``), and ``dq_values`` is None without double quantization.
    """
    nf4_values, dq_values = _codebooks(q.codes.device)
    if q.double_quant:
        return q.codes, q.absmax_codes, q.absmax_scale, q.absmax_offset, nf4_values, dq_values
    return q.codes, q.absmax, None, None, nf4_values, None


def _dequantize(q: NF4Weight, dtype: torch.dtype, backend: str | None = None) -> torch.Tensor:
    """dequantize_nf4 without the value checks, for a state checked when it was made (NF4Linear)."""
    flat = kernels.nf4_dequantize(*kernel_arguments(q), q.numel, q.blocksize, q.dq_blocksize, dtype, backend=backend)
    return flat.view(q.shape)
