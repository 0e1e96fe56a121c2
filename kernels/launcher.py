"""A Triton kernel launched again without the JIT's work on every call: its compiled form kept per specialization.

``kernel[grid](*args, **meta)`` runs Triton's JIT on every call: it binds the arguments to the kernel's signature,
works out each one's specialization (below), builds the cache key from them and the options (a string made anew
each call), looks the compiled kernel up, checks that no global the kernel read has changed, and only then launches.
For a kernel of 38 arguments — kernels/nf4_rows_gluon.py's — that was about 60 µs of a decode step's NF4 layer on an
H100 machine's host, whose kernel runs 7 µs on the GPU (benchmarks/RESULTS.md). ``launch`` keeps what the first
call compiled and launches it directly (``CompiledKernel[grid](*args)``, Triton's launch of a compiled kernel),
under a key with at least what Triton specializes on:

    a tensor   its dtype, and whether its address is a multiple of 16 bytes (then marked 16-byte aligned)
    an int     whether it is 1 (then compiled in as a constant), a multiple of 16 (marked divisible), and which
               of int32 / int64 holds it
    otherwise  its type (a float is never specialized; a bool or None is compiled in, so its value)
    and the constexprs, the launch options (num_warps, launch_pdl) and the device.

Two calls under one key would get one compiled kernel from the JIT too, so launching the kept one is what the JIT
would have launched. What this skips: the JIT's check of the globals a kernel reads (the kernels here read module
constants that never change) and its recompiling when a source file changes under a running process.

    launch(kernel, grid, (x, w, y, M, N), dict(BLOCK=128), dict(num_warps=4), device_index)

Not under the interpreter (``TRITON_INTERPRET=1`` has no compiled kernel): there every call goes to the JIT.
This module imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["launch", "clear"]

_INT32 = range(-(2**31), 2**31)
# (kernel, device, constexprs, options, each argument's specialization) -> (compiled kernel, constexprs' order)
_COMPILED: dict[tuple, tuple] = {}


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, options: dict, device_index: int) -> None:
    """``kernel[grid](*args, **constexprs, **options)`` on the current stream of GPU ``device_index``, which the
    caller has made the current device. ``args``: the kernel's leading parameters, in order; ``constexprs``: the
    rest, by name."""
    tensor = torch.Tensor
    key = (kernel, device_index, tuple(constexprs.items()), tuple(options.items()),   # each argument as Triton
           *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, tensor)              # specializes it (or more):
             else (a == 1, a % 16 == 0, a in _INT32) if type(a) is int                 # see the module docstring
             else a if a is None or type(a) is bool else type(a) for a in args])
    kept = _COMPILED.get(key)
    if kept is None:
        compiled = kernel[grid](*args, **constexprs, **options)       # the JIT: compiles on a miss, then launches
        if compiled is not None and hasattr(compiled, "function"):      # a compiled kernel (not the interpreter's)
            order = list(kernel.arg_names)[len(args):]                  # the constexprs' names, in signature order
            if sorted(order) == sorted(constexprs):
                _COMPILED[key] = (compiled, order)
        return
    compiled, order = kept
    compiled[(*grid, 1, 1)[:3]](*args, *[constexprs[n] for n in order], stream=_current_stream(device_index))


def _current_stream(device_index: int) -> int:
    """The current CUDA stream of GPU ``device_index`` as the driver's handle: what the JIT launches on."""
    return torch._C._cuda_getCurrentRawStream(device_index)


def clear() -> None:
    """Forget every kept kernel (the next call of each goes through the JIT again)."""
    _COMPILED.clear()
