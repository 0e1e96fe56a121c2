"""A tensor's version counter: what the caches of "auto" read to notice that a tensor changed in place.

torch adds 1 to ``t._version`` at every in-place change of t (``add_``, ``copy_``, an optimizer step), so a value
built from some tensors stays good while their versions stay the same: kernels/lora_routes.py keeps merged weights
W + scaling·B·A that way, kernels/multi_lora_routes.py stacks of adapters. A tensor made under
``torch.inference_mode`` keeps no counter (reading ``_version`` raises), yet can be changed in place inside that
mode: nothing tells a stale value from a good one. ``version`` says None for it, and the caches then compute the
call afresh and keep nothing.

This module imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["version"]


def version(t: torch.Tensor) -> int | None:
    """t's version counter; None for an inference tensor (made under ``torch.inference_mode``), which has none."""
    return None if t.is_inference() else t._version
