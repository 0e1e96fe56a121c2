"""What the Triton kernels can take: the sizes their 32-bit offsets reach, and the NF4 blocksizes their tiles assume.

The kernels compute element offsets in 32-bit integers, ``row · stride + column``: cheaper than 64-bit ones in every
load's address arithmetic, and right while every offset stays below 2³¹. So a call reaches the kernels only when every
tensor they read spans, and every buffer they write holds, fewer than 2³¹ elements; the switch (kernels/__init__.py)
sends a larger call to the reference on "auto" and refuses it on "triton", with ``too_large``'s words.

    span(t) = 1 + Σ_d (shape[d] - 1) · |stride[d]|     one past the largest offset a kernel adds to t's pointer

A contiguous tensor spans its numel, a stride-0 ``expand`` of one value spans 1, a slice of a larger tensor spans the
rows it skips over too.

The NF4 kernels tile quantization blocks (``tl.arange(0, blocksize // 2)``, whole blocks per tile row), so a
blocksize must be a power of two; ``NF4_BLOCKSIZES`` is bitsandbytes' range, 32 to 4096.

This module imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["OFFSET_LIMIT", "NF4_BLOCKSIZES", "span", "too_large"]

OFFSET_LIMIT = 2**31  # the first offset a signed 32-bit integer cannot hold
NF4_BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32, 64, ..., 4096


def span(t: torch.Tensor) -> int:
    """One past the largest element offset from t's first element that its shape and strides reach (0 if empty)."""
    if t.is_contiguous():  # the common case, and every empty tensor
        return t.numel()
    return 1 + sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride(), strict=True))


def too_large(tensors: Iterable[tuple[str, torch.Tensor | None]], sizes: Iterable[tuple[str, int]] = ()) -> str | None:
    """None when the kernels' 32-bit offsets reach every element; else which one does not, for an error message.

    ``tensors``: (name, tensor or None) the kernels index through its strides; ``sizes``: (what, element count) of
    the buffers the kernels make contiguous (an output, a reshaped copy, a workspace).
    """
    for name, t in tensors:
        if t is not None and span(t) >= OFFSET_LIMIT:
            return f"{name} of shape {tuple(t.shape)} spans {span(t)} elements"
    for what, n in sizes:
        if n >= OFFSET_LIMIT:
            return f"{what} has {n} elements"
    return None
