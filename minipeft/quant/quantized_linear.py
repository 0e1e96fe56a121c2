"""QuantizedLinear: what every frozen quantized linear layer shares, whatever its format (NF4, int8).

A quantized layer keeps its weight as packed integer codes plus fp32 statistics, in registered buffers, so
that ``.to(device)``, ``state_dict`` and safetensors work as for any module. Two things nn.Module would get
wrong are fixed here, once for every format:

    model.half()           casts every floating buffer: the fp32 statistics would be rounded  → device moves only
    load_state_dict(sd)    copies and casts what it can, leaves a missing buffer as it is    → exact keys, exact
                           (bitsandbytes #1946: a float checkpoint cast into uint8 codes)       dtypes and shapes,
                                                                                               finite statistics,
                                                                                               or an error

A subclass names its buffers (``_state_names``), says what to call its format in messages (``_state_kind``),
and provides ``dequantize_weight(dtype)``, ``in_features`` and ``out_features`` (``targets.is_linear_like``).
A subclass that can also hold its state in another layout (NF4Linear's block layout, which FSDP2 shards:
frozen uint8 parameters instead of buffers) says how a checkpoint's tensor maps to it (``_saved_layout``,
``_to_saved``, ``_to_held``); the checks below are made on the checkpoint's layout either way.
QLoRA: https://arxiv.org/abs/2305.14314; LLM.int8(): https://arxiv.org/abs/2208.07339.
"""

from __future__ import annotations

import abc

import torch
import torch.nn as nn

from .nf4 import _STATISTICS, _check_statistics

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module, abc.ABC):
    """Base class: frozen packed state in buffers that dtype casts leave alone, and strict loading.

    Subclasses set ``_ALL_STATE_NAMES`` (every buffer name any configuration of the format can hold) and
    define ``_state_names()`` (the buffers this layer holds) and ``_state_kind()`` (its format, in words).
    A state tensor held as a frozen non-floating parameter instead (NF4Linear.to_block_parameters) is left
    alone by dtype casts already: nn.Module casts floating tensors only.
    """

    _ALL_STATE_NAMES: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._in_features = in_features
        self._out_features = out_features

    @abc.abstractmethod
    def _state_names(self) -> tuple[str, ...]:
        """The names of the packed state this layer holds now (each subclass lists its own)."""

    @abc.abstractmethod
    def _state_kind(self) -> str:
        """What error messages call the packed state ("plain NF4", "double-quant NF4", "int8")."""

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self._out_features

    @property
    def device(self) -> torch.device:
        return self.codes.device

    # ---- device moves and dtype casts ----------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # nn.Module.to(dtype) / .half() cast every floating buffer: that would round the fp32 statistics.
        # The packed buffers follow device moves only; the bias follows the cast like any parameter.
        state = {name: self._buffers.pop(name) for name in self._state_names() if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in state.items():
                moved = fn(buf)
                if moved.dtype != buf.dtype:
                    moved = buf.to(device=moved.device)
                self._buffers[name] = moved
        return self

    # ---- the checkpoint's layout and the held one (the same unless a subclass holds another) -------
    def _saved_layout(self, name: str) -> tuple[torch.dtype, torch.Size]:
        """(dtype, shape) of state tensor ``name`` in a checkpoint."""
        held = getattr(self, name)
        return held.dtype, held.shape

    def _to_saved(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A state_dict's tensor ``name`` in the checkpoint's layout (``t`` itself unless it is in another
        layout this layer knows; anything else is returned as it is, for the checks to refuse)."""
        return t

    def _to_held(self, name: str, saved: torch.Tensor) -> torch.Tensor:
        """A checked tensor in the checkpoint's layout, in the layout this layer holds ``name`` in."""
        return saved

    # ---- loading: exactly the expected keys, or an error ---------------------------------------------
    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nn.Module would leave a missing buffer as it is (with strict=False) and cast a float tensor into
        # the integer codes without a word: both give silent garbage (bitsandbytes #1946). Every problem
        # found here goes to error_msgs, which load_state_dict raises whatever `strict` says.
        n_errors_before = len(error_msgs)
        expected = set(self._state_names())
        mine_keys = [key[len(prefix) :] for key in state_dict if key.startswith(prefix)]
        present = {name for name in mine_keys if "." not in name}  # own keys, not its children's
        kind = self._state_kind()
        for name in sorted(expected - present):
            where = prefix.rstrip(".") or f"this {type(self).__name__}"
            error_msgs.append(f"{prefix}{name}: missing from the state_dict; the {kind} state of {where} "
                              f"needs {sorted(expected)}")  # fmt: skip
        for name in sorted((present & (set(self._ALL_STATE_NAMES) | {"weight"})) - expected):
            if name == "weight":
                hint = " (a dense weight: load the checkpoint into the unquantized model, then quantize)"
            else:
                hint = f" (this layer holds a {kind} state: {sorted(expected)})"
            error_msgs.append(f"{prefix}{name}: unexpected key{hint}")
        errors = []
        saved = {name: self._to_saved(name, state_dict[prefix + name]) for name in sorted(expected & present)}
        for name, got in saved.items():
            dtype, shape = self._saved_layout(name)
            if got.dtype != dtype or got.shape != shape:
                errors.append(f"{prefix}{name}: expected {dtype} of shape {tuple(shape)}, "
                              f"got {got.dtype} of shape {tuple(got.shape)}")  # fmt: skip
        if not errors and expected <= present:
            # the values too (statistics finite and ≥ 0): NaN statistics would make every forward NaN, and
            # forward does not check (a value check there is a host sync per layer)
            try:
                _check_statistics({prefix + n: saved[n] for n in sorted(expected) if n in _STATISTICS})
            except ValueError as e:
                errors.append(str(e))
        if len(error_msgs) > n_errors_before or errors:
            # refused: leave this layer's state as it was (nn.Module would copy, and cast, what it can)
            error_msgs.extend(errors)
            return
        # this layer's own keys, the state in the layout it holds (the caller's dict is not changed)
        own = {key: value for key, value in state_dict.items() if key.startswith(prefix)}
        own.update({prefix + name: self._to_held(name, t) for name, t in saved.items()})
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
