"""Tensors that no kernel writes: made once by a copy from the host, then only read (the NF4 codebooks).

On Hopper a kernel can be launched as the previous kernel's programmatic dependent: its programs start while
that kernel still runs, and wait for all of it (``griddepcontrol.wait``) before reading what it may have written.
What no kernel ever writes can be read before the wait. kernels/nf4_rows_gluon.py makes its lookup tables from the
codebooks that way, so a launch makes them while the one before it finishes — but only from codebooks marked
here: a codebook passed by a caller might have been made by the very kernel before it (``.contiguous()``, a cast).

    codebook = constant(values.to(device))    # copied from the host, which waits for the copy: then marked
    is_constant(codebook)                     # True for that object (not for a copy or a view of it)

A marked tensor is kept alive here (its ``id`` stays its own) and must never be written again; minipeft's
per-device codebooks (``minipeft.quant.nf4._codebooks``) are the ones marked.

This module imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["constant", "is_constant"]

_CONSTANTS: dict[int, torch.Tensor] = {}


def constant(t: torch.Tensor) -> torch.Tensor:
    """Marks ``t`` as never written by a kernel from now on and returns it. On CUDA the host first waits for the
    work queued so far on t's device (the copy that made it), so that no later launch can overlap its making."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"constant: t must be a torch.Tensor, got {type(t).__name__}")
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    _CONSTANTS[id(t)] = t
    return t


def is_constant(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a tensor marked by ``constant`` (that very object)."""
    return t is not None and _CONSTANTS.get(id(t)) is t
