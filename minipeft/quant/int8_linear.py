"""Int8Linear: a frozen Linear whose weight is stored in 8 bits, multiplied with LLM.int8()'s mixed-precision
decomposition (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339):

    y = x[:, O]·Ŵ[:, O]ᵀ + (X₈·W₈ᵀ) ⊙ (a_x·a_wᵀ) / 127² + bias,    O = the input columns holding any |x| ≥ threshold

The outlier columns O of the activations go through a 16-bit matmul with the dequantized weight columns, the
rest through int8 × int8 → int32 with row-wise scales: kernels/int8_reference.py has the math and a worked
example. The layer calls ``kernels.int8_linear``, on the kernel switch: "reference" runs those PyTorch ops
(bit-identical with bitsandbytes), "triton" the kernels of kernels/int8_triton.py, "auto" the Triton kernels on
CUDA. Shapes: x (..., in) → y (..., out), codes (out, in) int8, absmax (out,) fp32.

Backward (the weight is frozen): dx = dy · Ŵ, with Ŵ dequantized from the codes again, as bitsandbytes'
``MatMul8bitLt`` does; nothing saves a dense weight (kernels/int8_autograd.py: one registered op,
``minipeft::int8_linear``, so torch.compile sees one node even though the outlier columns are found from the data).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minipeft import kernels
from minipeft.checks import is_finite, shown

from .int8 import Int8Weight, quantize_int8
from .nf4 import _FLOAT_DTYPES, _check_bias, _check_out_dtype
from .quantized_linear import QuantizedLinear

__all__ = ["Int8Linear"]

DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, and bitsandbytes' default for Linear8bitLt


class Int8Linear(QuantizedLinear):
    """A linear layer with a frozen row-wise int8 weight and LLM.int8()'s outlier decomposition.

    Buffers ``codes`` ``(out, in)`` int8 and ``absmax`` ``(out,)`` fp32 (``Int8Weight``'s fields); an optional
    frozen bias. Device moves, dtype casts and strict loading as every ``QuantizedLinear``; no ``.weight``
    (``dequantize_weight()`` gives a dense copy).

    Args:
        threshold: input columns holding any |x| ≥ threshold go through a 16-bit matmul (0: none do).
            6.0, LLM.int8()'s value and bitsandbytes' default.

    Example: 4096 → 4096 holds 16 MiB of codes and 16 KiB of absmax instead of 32 MiB of bf16.
    """

    _ALL_STATE_NAMES = ("codes", "absmax")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        _check_threshold(threshold)
        if weight_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight_dtype must be float32, bfloat16 or float16 (the dtype the weight had), "
                             f"got {weight_dtype!r}")  # fmt: skip
        self.threshold = float(threshold)
        self.weight_dtype = weight_dtype
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> Int8Linear:
        """Quantize ``linear.weight`` (on its device) and keep a frozen copy of its bias.

        Raises ValueError where ``quantize_int8`` does (NaN/inf in the weight), naming ``linear.weight``, and for
        NaN/inf in ``linear.bias``.
        """
        w = linear.weight.detach()
        _check_bias(linear.bias, "linear.bias")
        q = quantize_int8(w, name="linear.weight")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, threshold=threshold,
                    weight_dtype=w.dtype, device=w.device)  # fmt: skip
        layer.codes.copy_(q.codes)
        layer.absmax.copy_(q.absmax)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _state_names(self) -> tuple[str, ...]:
        return self._ALL_STATE_NAMES

    def _state_kind(self) -> str:
        return "int8"

    def int8_weight(self) -> Int8Weight:
        """The buffers as an ``Int8Weight`` (no copy)."""
        return Int8Weight(codes=self.codes, absmax=self.absmax, dtype=self.weight_dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default: the original dtype)."""
        if dtype is None:
            dtype = self.weight_dtype
        _check_out_dtype(dtype)
        return kernels.int8_dequantize(self.codes, self.absmax, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) in x's dtype (autocast's, when it is on)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., {self.in_features})")
        if x.device != self.codes.device:
            raise ValueError(f"x is on {x.device} but the int8 codes are on {self.codes.device}; move them together")
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(x.device.type))  # F.linear's autocast rule (the op computes in x's)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return kernels.int8_linear(x, self.codes, self.absmax, bias, self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")  # fmt: skip


def _check_threshold(threshold: object) -> None:
    """A finite number ≥ 0, or a ValueError naming ``threshold`` (the rule ``kernels.int8_linear`` applies too)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not is_finite(threshold) \
            or threshold < 0:  # fmt: skip
        raise ValueError(f"threshold must be a finite number ≥ 0 (6.0 in LLM.int8(); 0 turns the outlier "
                         f"decomposition off), got {shown(threshold)}")  # fmt: skip
