"""NF4Linear: a frozen nn.Linear whose weight is stored as NF4 codes and dequantized in every forward.

This is the base layer of QLoRA: the big weight sits in ~4.13 bits per parameter, and a forward pass turns it
back into the input's dtype just long enough for one matmul; gradients flow to the input (and to LoRA
adapters attached around it), never to the quantized weight.

    y = x · dequantize_nf4(W_q)ᵀ + b

QLoRA: https://arxiv.org/abs/2305.14314. ``quantize_model`` swaps a model's nn.Linear layers for NF4Linear.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from minipeft import kernels
from minipeft.targets import ALL_LINEAR, find_target_modules, is_lm_head, set_submodule, tied_parameter_ids

from .int8 import _check_int8_quantizable, int8_nbytes
from .int8_linear import DEFAULT_THRESHOLD, Int8Linear, _check_threshold
from .nf4 import (
    _FLOAT_DTYPES,
    DQ_BLOCKSIZE,
    NF4Weight,
    _check_bias,
    _check_blocksize,
    _check_double_quant_flag,
    _check_out_dtype,
    _check_quantizable,
    _codebooks,
    _dequantize,
    _state_layout,
    kernel_arguments,
    nf4_nbytes,
    quantize_nf4,
)
from .nf4_blocks import SHARDED_FIELDS, from_blocks, to_blocks
from .quantized_linear import QuantizedLinear

__all__ = ["NF4Linear", "quantize_model", "weight_bytes_report"]

logger = logging.getLogger(__name__)

_DQ_KEYS = ("codes", "absmax_codes", "absmax_scale", "absmax_offset")
_PLAIN_KEYS = ("codes", "absmax")


class NF4Linear(QuantizedLinear):
    """A linear layer with a frozen NF4 weight (and an optional frozen bias).

    The packed state is held in registered buffers named like ``NF4Weight``'s fields, so ``.to(device)``,
    ``state_dict`` and safetensors work; a dtype cast (``model.half()``, ``model.to(torch.bfloat16)``) moves
    them but never changes their dtypes. ``forward`` dequantizes to the input's dtype. There is no
    ``.weight`` attribute on purpose: a dense tensor made on the fly would silently swallow in-place edits
    (merging, say); call ``dequantize_weight()`` to get one.

    Shapes: weight ``(out_features, in_features)``; x ``(..., in_features)`` → y ``(..., out_features)``.
    Example: 4096 → 4096 with blocksize 64 and double quantization holds 8 MiB of codes, 256 KiB of absmax
    codes and 4 KiB of scales instead of 32 MiB of bf16. Device moves, dtype casts and strict loading: see
    ``QuantizedLinear``.

    For FSDP2, ``to_block_parameters()`` re-holds the state as frozen uint8 parameters with one row per
    quantization block (minipeft/quant/nf4_blocks.py), which ``fully_shard`` splits between the ranks
    (``minipeft.finetune.shard_fsdp`` does both).
    """

    _ALL_STATE_NAMES = tuple(dict.fromkeys(_DQ_KEYS + _PLAIN_KEYS))

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        _check_blocksize(blocksize)
        _check_double_quant_flag(double_quant)
        if weight_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight_dtype must be float32, bfloat16 or float16 (the dtype the weight had), "
                             f"got {weight_dtype!r}")  # fmt: skip
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.weight_dtype = weight_dtype  # the dtype the weight had; dequantize_weight()'s default
        self.holds_blocks = False  # True after to_block_parameters(): the layout FSDP2 shards
        # Zeros, not torch.empty: an NF4Linear built directly (to load a checkpoint into) never holds garbage.
        for name, (dtype, shape, _why) in self._flat_layout().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize ``linear.weight`` (on its device) and keep a frozen copy of its bias.

        Raises ValueError where ``quantize_nf4`` does (NaN/inf in the weight, ...), naming ``linear.weight``,
        and for NaN/inf in ``linear.bias``;
        TypeError for a ``double_quant`` that is not a bool.
        """
        w = linear.weight.detach()
        _check_bias(linear.bias, "linear.bias")
        q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant, name="linear.weight")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, blocksize=blocksize,
            double_quant=double_quant, weight_dtype=w.dtype, device=w.device,
        )  # fmt: skip
        for name in layer._state_names():
            getattr(layer, name).copy_(getattr(q, name))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _state_names(self) -> tuple[str, ...]:
        return _DQ_KEYS if self.double_quant else _PLAIN_KEYS

    def _state_kind(self) -> str:
        return "double-quant NF4" if self.double_quant else "plain NF4"

    def _flat_layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], str]]:
        """The state as ``NF4Weight`` lays it out (and checkpoints store it): (dtype, shape, why) by field."""
        return _state_layout(self.in_features * self.out_features, self.blocksize, self.double_quant, DQ_BLOCKSIZE)

    # ---- the block layout (what FSDP2 shards) ---------------------------------------------------------
    def to_block_parameters(self) -> NF4Linear:
        """Re-hold the packed state, in place, as frozen uint8 parameters with one row per quantization block;
        returns self. Calling it again does nothing.

        FSDP2 shards parameters along dim 0 and never buffers, and a bf16 ``MixedPrecisionPolicy`` casts every
        floating parameter it gathers: in this layout a dim-0 shard is whole blocks with their statistics, and
        the fp32 statistics travel as bytes that no cast touches (the table and the reasons:
        minipeft/quant/nf4_blocks.py). The weight is the same bit for bit; ``forward``, ``lora_forward`` and
        ``dequantize_weight`` read it through views. ``state_dict`` then holds the block layout (the shapes of
        the parameters, as FSDP2's and torch.distributed.checkpoint's machinery expects), and
        ``load_state_dict`` takes either layout, here and on a flat layer. Load a checkpoint before sharding:
        a sharded layer's parameters are DTensors, which this layer does not load into.
        """
        if self.holds_blocks:
            return self
        numel = self.in_features * self.out_features
        for name in self._state_names():
            if name in SHARDED_FIELDS:
                held = to_blocks(name, self._buffers.pop(name), numel, self.blocksize)
                self.register_parameter(name, nn.Parameter(held, requires_grad=False))
        self.holds_blocks = True
        return self

    def _saved_layout(self, name: str) -> tuple[torch.dtype, torch.Size]:
        dtype, shape, _why = self._flat_layout()[name]
        return dtype, torch.Size(shape)

    def _block_layout(self, name: str) -> tuple[torch.dtype, torch.Size]:
        dtype, shape, _why = self._flat_layout()[name]
        held = to_blocks(name, torch.empty(shape, dtype=dtype, device="meta"), self.in_features * self.out_features,
                         self.blocksize)  # fmt: skip
        return held.dtype, held.shape

    def _to_saved(self, name: str, t: torch.Tensor) -> torch.Tensor:
        # a state_dict of a layer in the block layout (say, gathered from an FSDP2-sharded model) loads too
        if name in SHARDED_FIELDS and (t.dtype, t.shape) == self._block_layout(name):
            return from_blocks(name, t, self.in_features * self.out_features)
        return t

    def _to_held(self, name: str, saved: torch.Tensor) -> torch.Tensor:
        if self.holds_blocks and name in SHARDED_FIELDS:
            return to_blocks(name, saved, self.in_features * self.out_features, self.blocksize)
        return saved

    def nf4_weight(self) -> NF4Weight:
        """The state as an ``NF4Weight`` (no copy: in the block layout, flat views of the parameters)."""
        state = {name: getattr(self, name) for name in self._state_names()}
        if self.holds_blocks:
            numel = self.in_features * self.out_features
            state = {name: from_blocks(name, t, numel) for name, t in state.items()}
        return NF4Weight(shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                         blocksize=self.blocksize, **state)  # fmt: skip

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default: the original dtype).

        The state is not checked again here (``forward`` calls this on every step; a value check would cost a
        host sync per layer): it was checked where it came in, by ``quantize_nf4`` or by ``load_state_dict``.
        """
        if dtype is None:
            dtype = self.weight_dtype
        _check_out_dtype(dtype)
        return _dequantize(self.nf4_weight(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) through ``kernels.nf4_linear``: the weight is dequantized to x's dtype on
        the kernel switch's backend, and backward keeps the 4-bit codes, not the dense weight."""
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
            # F.linear's autocast rule, applied here: the op below computes in x's dtype (kernels/nf4_autograd.py)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        q = self.nf4_weight()
        return kernels.nf4_linear(x, *kernel_arguments(q), bias, self.out_features, self.in_features,
                                  self.blocksize, q.dq_blocksize)  # fmt: skip

    def lora_forward(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     dropout_mask: torch.Tensor | None) -> torch.Tensor:
        """This layer plus a LoRA adapter's term, x (..., in) → (..., out), through ``kernels.nf4_lora_linear``:
        on the "triton" backend one fused kernel reads the 4-bit codes and adds the low-rank term in its
        epilogue (kernels/nf4_lora_triton.py). ``LoraLinear`` calls it on an NF4 base; x is in the compute dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        q = self.nf4_weight()
        return kernels.nf4_lora_linear(x, *kernel_arguments(q), bias, self.out_features, self.in_features,
                                       self.blocksize, q.dq_blocksize, lora_A, lora_B, scaling, dropout_mask)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}, double_quant={self.double_quant}"
            + (", holds_blocks=True" if self.holds_blocks else "")
        )

    # ---- device moves (QuantizedLinear keeps the dtypes) ---------------------------------------------
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        _codebooks(self.codes.device)  # the tables, ready on the new device (no host copy in forward)
        return self


def quantize_model(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    blocksize: int | None = None,
    double_quant: bool | None = None,
    *,
    bits: int = 4,
    threshold: float | None = None,
) -> nn.Module:
    """Replace ``model``'s nn.Linear layers by ``NF4Linear`` (``bits=4``) or ``Int8Linear`` (``bits=8``),
    **in place**, and return the same model.

    The model is mutated (that is the point: the dense weights are dropped as each layer is swapped, so a
    large model never needs two copies); the return value is for chaining.

    Args:
        target_modules: chosen exactly as LoRA's are (minipeft/targets.py): ``"all-linear"`` (every nn.Linear
            except ``lm_head``), a list of names (``name == t`` or ``name.endswith("." + t)``) or a regex
            string matched against the whole name. Layers already quantized (NF4 or int8) are left as they are.
        blocksize, double_quant: as in ``quantize_nf4``; for ``bits=4`` only. Not given (None): 64 and True,
            QLoRA's choices.
        bits: 4 (NF4, QLoRA) or 8 (row-wise int8, LLM.int8()); keyword-only.
        threshold: ``Int8Linear``'s outlier threshold (0 turns the decomposition off); for ``bits=8`` only.
            Not given (None): ``DEFAULT_THRESHOLD``, LLM.int8()'s 6.0.

    An option of the other format is refused, never dropped: ``bits=8`` with ``blocksize`` or ``double_quant``
    given, or ``bits=4`` with ``threshold`` given, raises ValueError (even where the value given is the default,
    which would do nothing there either).

    A Linear whose weight is tied to another parameter (GPT-2's ``lm_head`` shares the token embedding) is
    never quantized: "all-linear" skips it, naming it explicitly raises. Raises TypeError when
    ``double_quant`` is not a bool; ValueError when ``bits`` is not 4 or 8, an option of the other format is
    given, ``blocksize`` or ``threshold`` is out of range, a target matches no Linear, selects a layer that
    already carries adapters (quantize first, then attach), or selects a weight that ``quantize_nf4`` /
    ``quantize_int8`` refuses (NaN/inf, absmax values double quantization cannot hold; the message names the
    weight, e.g. ``transformer.h.0.attn.c_attn.weight``). Every chosen weight is checked before the first layer
    is swapped, so a refused call leaves the model exactly as it was.
    """
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}")
    # None means "not given": an option given for the other format is a mistake to report, not to drop.
    if bits == 4:
        if threshold is not None:
            raise ValueError(f"threshold is an option of bits=8 (Int8Linear's outlier threshold); with bits=4 (NF4) "
                             f"leave it out, got threshold={threshold!r}")
        blocksize = 64 if blocksize is None else blocksize
        double_quant = True if double_quant is None else double_quant
        _check_blocksize(blocksize)
        _check_double_quant_flag(double_quant)
    else:
        given = {k: v for k, v in (("blocksize", blocksize), ("double_quant", double_quant)) if v is not None}
        if given:
            raise ValueError(f"blocksize and double_quant are options of bits=4 (NF4); with bits=8 (int8) leave "
                             f"them out, got {', '.join(f'{k}={v!r}' for k, v in given.items())}")
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        _check_threshold(threshold)
    chosen = [t for t in find_target_modules(model, target_modules) if not isinstance(t.module, QuantizedLinear)]
    wrapped = [t.name for t in chosen if not isinstance(t.module, nn.Linear)]
    if wrapped:
        raise ValueError(f"target_modules selects {wrapped[:3]}, which already carry adapters; quantize the base "
                         "model first, then attach the adapters")
    tied = tied_parameter_ids(model)
    tied_chosen = [t.name for t in chosen if id(t.module.weight) in tied]
    if tied_chosen and target_modules == ALL_LINEAR:
        logger.info("quantize_model: leaving tied Linear layers unquantized: %s", tied_chosen)
    elif tied_chosen:
        raise ValueError(
            f"target_modules selects {tied_chosen}, whose weight is tied to another parameter; "
            "quantizing it would untie it (and quantize the embedding's copy too)"
        )
    todo = [(raw, linear) for _name, raw, linear in chosen if id(linear.weight) not in tied]
    # Every weight is checked before any layer is swapped: a refusal halfway would leave a half-quantized model.
    for raw, linear in todo:
        try:
            if bits == 4:
                _check_quantizable(linear.weight, blocksize, double_quant, name=f"{raw}.weight")
            else:
                _check_int8_quantizable(linear.weight, name=f"{raw}.weight")
            _check_bias(linear.bias, f"{raw}.bias")
        except ValueError as e:
            raise ValueError(f"{e} (quantize_model changed nothing: the model is as it was)") from None
    for raw, linear in todo:
        if bits == 4:
            layer = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
        else:
            layer = Int8Linear.from_linear(linear, threshold=threshold)
        set_submodule(model, raw, layer)
    return model


def _weights_to_quantize(model: nn.Module) -> Iterable[tuple[str, int, int]]:
    """(name, out_features, in_features) of every weight that ``quantize_model(..., "all-linear")`` quantizes
    or has quantized."""
    tied = tied_parameter_ids(model)
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            yield name, m.out_features, m.in_features
        elif isinstance(m, nn.Linear) and name and not is_lm_head(name) and id(m.weight) not in tied:
            yield name, m.out_features, m.in_features


def weight_bytes_report(model: nn.Module, blocksize: int = 64) -> dict[str, int]:
    """A model's weight bytes stored five ways: all fp32, all bf16, LLM.int8-style int8, and QLoRA-style
    NF4 / NF4 + double quant.

    In the int8 and NF4 rows the weights that ``quantize_model(model)`` ("all-linear") quantizes are counted
    at their exact quantized size (``int8_nbytes``, ``nf4_nbytes``: the sizes ``quantize_int8`` and
    ``quantize_nf4`` allocate), everything else (embeddings, norms, biases, a tied or untied lm_head) at bf16,
    as QLoRA and LLM.int8() keep them. Works on a dense or an already quantized model (a quantized layer
    counts as its logical ``out × in`` weight). Tied weights count once.

    Returns: ``{"fp32", "bf16", "int8", "nf4", "nf4_dq"}`` in bytes, plus ``"params"`` (all weights) and
    ``"quantized_params"`` (those quantized).
    """
    _check_blocksize(blocksize)  # before any layer: a model with none would accept any blocksize
    quantized = {name: (out, inp) for name, out, inp in _weights_to_quantize(model)}
    n_quantized = sum(out * inp for out, inp in quantized.values())
    n_other = sum(p.numel() for p in model.parameters())  # named_parameters() dedups tied weights
    dense_quantizable = [m for n, m in model.named_modules() if n in quantized and isinstance(m, nn.Linear)]
    n_other -= sum(m.weight.numel() for m in dense_quantizable)
    n_all = n_other + n_quantized
    sizes = [out * inp for out, inp in quantized.values()]
    return {
        "fp32": 4 * n_all,
        "bf16": 2 * n_all,
        "int8": 2 * n_other + sum(int8_nbytes(out, inp) for out, inp in quantized.values()),
        "nf4": 2 * n_other + sum(nf4_nbytes(n, blocksize, double_quant=False) for n in sizes),
        "nf4_dq": 2 * n_other + sum(nf4_nbytes(n, blocksize, double_quant=True) for n in sizes),
        "params": n_all,
        "quantized_params": n_quantized,
    }
