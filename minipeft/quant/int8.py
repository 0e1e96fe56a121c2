"""Int8: row-wise absmax quantization to 8-bit integers, the weight format of LLM.int8(), bit-exact with
bitsandbytes' ``int8_vectorwise_quant``.

Each row of a 2-D weight (one output feature of a Linear) is divided by its absolute maximum and scaled to
[-127, 127]; the row's absmax is kept in fp32 to undo it:

    absmax_r = max_j |w_rj|,    code_rj = round(127 · w_rj / absmax_r) ∈ [-127, 127],    ŵ_rj = code_rj · absmax_r / 127

(``round`` is round-half-to-even; an all-zero row gets absmax 0 and codes 0.) Storage: 8 bits per weight plus
32 per row, 8.01 bits per parameter for a 4096-wide row. The same quantizer, applied row-wise to activations,
is the first step of LLM.int8()'s matmul (kernels/int8_reference.py, which holds ``rowwise_int8``).
Dettmers et al. 2022, LLM.int8(): https://arxiv.org/abs/2208.07339.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minipeft import kernels
from minipeft.kernels.int8_reference import rowwise_int8

from .nf4 import _FLOAT_DTYPES, _check_count, _check_out_dtype, _check_statistics, _check_weight

__all__ = ["Int8Weight", "quantize_int8", "dequantize_int8", "int8_nbytes", "rowwise_int8"]


@dataclass(eq=False)
class Int8Weight:
    """A row-wise int8 weight: plain tensors mirroring bitsandbytes' ``Int8Params`` (``CB`` and ``SCB``).

    ``codes``: ``(out, in)`` int8 in [-127, 127] (bnb: ``CB``). ``absmax``: ``(out,)`` fp32, each row's largest
    |w| (bnb: ``SCB``). ``dtype``: the original weight's.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel()

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.codes.numel()


def int8_nbytes(out_features: int, in_features: int) -> int:
    """Bytes ``quantize_int8`` produces for an ``(out_features, in_features)`` weight, without building it."""
    _check_count(out_features, "out_features")
    _check_count(in_features, "in_features")
    return out_features * in_features + 4 * out_features


def quantize_int8(w: torch.Tensor, *, name: str = "w") -> Int8Weight:
    """Quantize a 2-D weight ``(out, in)`` row by row to int8, bit-identical with ``int8_vectorwise_quant``.

    Args:
        w: fp32/bf16/fp16, any strides (read in logical order).
        name: what the error messages call ``w`` (``Int8Linear.from_linear`` says ``linear.weight``).

    Raises:
        TypeError: ``w`` is not a tensor.
        ValueError: ``w`` is not 2-D, is empty, is not float32/bfloat16/float16, or holds NaN or inf.
    """
    _check_int8_quantizable(w, name)
    codes, absmax = rowwise_int8(w.detach())
    return Int8Weight(codes=codes, absmax=absmax, dtype=w.dtype)


def _check_int8_quantizable(w: torch.Tensor, name: str = "w") -> None:
    """Everything ``quantize_int8`` refuses, found without quantizing (``quantize_model`` checks every weight
    before it swaps the first layer)."""
    _check_weight(w, name)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}; "
                         "row-wise int8 keeps one absmax per row of a Linear's weight")  # fmt: skip
    if not torch.isfinite(w.detach()).all():
        bad = (~torch.isfinite(w.detach())).nonzero()
        raise ValueError(f"{name} contains NaN or inf ({len(bad)} of {w.numel()} values, the first at index "
                         f"{tuple(bad[0].tolist())}); int8 needs finite weights")  # fmt: skip


def _check_int8_weight(q: Int8Weight) -> None:
    """Refuse an ``Int8Weight`` whose fields disagree: types, dtypes, shapes, one device; on the CPU also
    the absmax values (finite, ≥ 0), as ``quantize_int8`` makes them."""
    if not isinstance(q, Int8Weight):
        raise TypeError(f"q must be an Int8Weight (from quantize_int8), got {type(q).__name__}")
    if not isinstance(q.codes, torch.Tensor) or q.codes.dtype != torch.int8 or q.codes.dim() != 2:
        got = f"{q.codes.dtype} of shape {tuple(q.codes.shape)}" if isinstance(q.codes, torch.Tensor) else q.codes
        raise ValueError(f"q.codes must be a 2-D int8 tensor (out, in), got {got}")
    out_features = q.codes.shape[0]
    if not isinstance(q.absmax, torch.Tensor) or q.absmax.dtype != torch.float32 or q.absmax.shape != (out_features,):
        got = f"{q.absmax.dtype} of shape {tuple(q.absmax.shape)}" if isinstance(q.absmax, torch.Tensor) else q.absmax
        raise ValueError(f"q.absmax must be float32 of shape ({out_features},), one per row of the codes, got {got}")
    if q.absmax.device != q.codes.device:
        raise ValueError(f"q.absmax is on {q.absmax.device} but q.codes is on {q.codes.device}; keep them together")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q.dtype (the original weight's) must be float32, bfloat16 or float16, got {q.dtype!r}")
    if q.codes.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_statistics({"q.absmax": q.absmax})


def dequantize_int8(q: Int8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ŵ = code · absmax / 127, as ``(out, in)`` in ``dtype`` (default: the original ``q.dtype``).

    Computed in fp32 as bitsandbytes' ``int8_vectorwise_dequant`` does (``code · absmax · (1/127)``, the
    reciprocal rounded to fp32), then rounded once to ``dtype``.

    Raises:
        TypeError, ValueError: ``q`` is not a consistent Int8Weight; ``dtype`` is not a floating dtype.
    """
    _check_int8_weight(q)
    if dtype is not None:
        _check_out_dtype(dtype)
    return kernels.int8_dequantize(q.codes, q.absmax, q.dtype if dtype is None else dtype)
