"""Triton's CPU interpreter (``TRITON_INTERPRET=1``): whether it is on, and the lock that makes its launches
safe to call from several threads at once.

The interpreter runs a kernel as Python, one program after another, and while it does so it changes state that
every thread shares (triton 3.x, ``triton/runtime/interpreter.py``):

    launch(kernel, grid):
        patch triton.language     # tl.load, tl.dot, ... replaced, module-wide, by NumPy versions
        builder.grid_dim = grid   # ONE global builder for the whole process
        for idx in grid:
            builder.grid_idx = idx  # what tl.program_id() reads
            kernel(...)
        restore triton.language

Two threads launching at once overwrite each other's ``grid_dim``/``grid_idx`` (a program computes another
program's tile, or fails with "x >= grid_dim[0]"), and one thread's restore pulls the patched ``tl.*`` out from
under the other ("Did you forget to add @triton.jit ?"). So every interpreted launch in this package runs under
one lock. A compiled kernel on a GPU shares none of that state, so there the lock is not taken: it would only
serialize host work that can overlap.

This module imports only the standard library, so the package can ask ``INTERPRETING`` without Triton.
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["INTERPRETING", "interpreter_lock"]

# Triton reads TRITON_INTERPRET when a kernel is decorated (when lora_triton / nf4_triton are imported, which
# import this module first); setting it later changes nothing, so its value at import is the one that counts.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Re-entrant, so that a launch made while holding it (an autotuner hook, a kernel wrapper calling another)
# waits on nobody instead of deadlocking on itself.
_LAUNCH_LOCK: contextlib.AbstractContextManager = threading.RLock()
_NO_LOCK = contextlib.nullcontext()  # reusable: one instance serves every call


def interpreter_lock() -> contextlib.AbstractContextManager:
    """``with interpreter_lock(): kernel[grid](...)``: the process-wide launch lock when interpreting, else a no-op.

    A function rather than a bare lock object, so that the choice is made in one place, and the tests can swap
    ``_LAUNCH_LOCK`` for a no-op to watch unlocked launches collide.
    """
    return _LAUNCH_LOCK if INTERPRETING else _NO_LOCK
