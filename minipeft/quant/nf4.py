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

from minipeft.kernels.nf4_reference import nf4_dequantize_reference

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

_VALID_BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32, 64, ..., 4096
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
        """A copy on ``device``; dtypes are kept (the packed state must never be cast)."""
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        _codebooks(moved["codes"].device)  # have the tables ready on that device for dequantize_nf4
        return NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
                         dq_blocksize=self.dq_blocksize, **moved)  # fmt: skip


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes ``quantize_nf4`` produces for ``numel`` weights, without building them (for size reports)."""
    n_blocks = -(-numel // blocksize)
    codes = (numel + 1) // 2
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * -(-n_blocks // DQ_BLOCKSIZE) + 4


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w must be float32, bfloat16 or float16, got {w.dtype} (convert it: w.float())")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {tuple(w.shape)}); there is nothing to quantize")
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or inf; NF4 needs finite weights (a NaN poisons its block's absmax)")


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


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


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` (any shape, fp32/bf16/fp16) to NF4, bit-identical with bitsandbytes' CPU path.

    Args:
        w: the weight. Any layout: it is read in logical (row-major) order, so a transposed or otherwise
            non-contiguous tensor gives the same result as its ``.contiguous()`` copy.
        blocksize: values per absmax, a power of two from 32 to 4096. The last block may be partial.
        double_quant: also quantize the absmax values (8 bits per block + an fp32 scale per 256 blocks).

    Returns:
        an ``NF4Weight`` on ``w``'s device.

    Raises:
        ValueError: ``w`` has NaN/inf, is empty or not a float16/bfloat16/float32 tensor; bad ``blocksize``.
    """
    _check_weight(w)
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()  # (n,) logical order; bnb also computes in fp32
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # zeros: absmax unchanged

    # 1. one absmax per block, and every value scaled into [-1, 1] by it
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]  # an all-zero block stays 0
    if n % blocksize:
        # bitsandbytes' CPU path treats a trailing partial block apart: it stores its absmax clamped to
        # 1e-38 and divides by it instead of multiplying by the reciprocal (a 1-ulp difference at most).
        # Mirrored here so the codes and statistics stay bit-identical.
        absmax[-1] = absmax[-1].clamp(min=1e-38)
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
    offset = absmax.mean()  # 0-dim fp32
    q.absmax_codes, q.absmax_scale = _quantize_absmax_8bit(absmax - offset, DQ_BLOCKSIZE)
    q.absmax_offset = offset
    return q


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _codebooks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 and dynamic-map tables on ``device``, made once per device.

    Cached so that a CUDA call copies nothing from the host (a copy would also stop CUDA-graph capture).
    ``quantize_nf4`` and ``NF4Weight.to`` fill the cache, so a compiled ``dequantize_nf4`` finds the tables
    there and treats them as graph inputs.
    """
    tables = _TABLES.get(device)
    if tables is None:
        tables = _TABLES[device] = (NF4_CODEBOOK.to(device), SIGNED_DYNAMIC_MAP.to(device))
    return tables


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ŵ = NF4[code] · absmax, with the absmax first decoded if it was double-quantized.

    Returns a tensor of ``q.shape`` in ``dtype`` (default: the original ``q.dtype``), computed in fp32 and
    rounded once, so it equals bitsandbytes' ``dequantize_4bit`` of the same state. Pure tensor operations:
    ``torch.compile(dequantize_nf4, fullgraph=True)`` works and makes one kernel. The math is in
    ``kernels/nf4_reference.py`` (shared with the Triton kernel ``kernels/nf4_triton.py``).
    """
    dtype = q.dtype if dtype is None else dtype
    nf4_values, dq_values = _codebooks(q.codes.device)
    if q.double_quant:
        absmax, scale, offset = q.absmax_codes, q.absmax_scale, q.absmax_offset
    else:
        absmax, scale, offset = q.absmax, None, None
    flat = nf4_dequantize_reference(
        q.codes, absmax, scale, offset, nf4_values, dq_values,
        numel=q.numel, blocksize=q.blocksize, dq_blocksize=q.dq_blocksize, dtype=dtype,
    )  # fmt: skip
    return flat.view(q.shape)
