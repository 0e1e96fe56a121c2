"""The LoRA linear layer behind one switch: a pure-PyTorch reference, Triton kernels, and a measured "auto".

Every LoRA layer calls ``lora_linear``; which implementation runs is chosen here, at run time, so switching
the backend switches every layer of a model (LoRA: https://arxiv.org/abs/2106.09685; the fused kernel
follows LoRAFusion's split, https://arxiv.org/abs/2510.00206).

    y = x·Wᵀ + bias + scaling·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ

Shapes: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r), dropout_mask None
or shaped like x and already scaled by 1/(1-p). Gradients reach x, lora_A, lora_B and a bias that requires
one; never the (frozen) weight.

A backend name is a promise:
  - "reference": the PyTorch ops of kernels/reference.py, always.
  - "triton": the Triton kernels of kernels/lora_triton.py on every call, forward and backward, training and
    inference, every shape, fp32/fp16/bf16; never a torch route. Where Triton cannot run on the given tensors
    (no Triton, CPU tensors without ``TRITON_INTERPRET=1`` set before ``import minipeft``, float64, bf16 in
    the interpreter, a tensor too large for the kernels' 32-bit offsets: kernels/limits.py) it raises a
    ValueError that says why.
  - "auto": on CUDA, the route that measured fastest for the shape and device (kernels/lora_routes.py: the
    reference's ops, cuBLAS routes, a merged-weight cache or the Triton kernels; its docstring has the table;
    while torch.compile traces, the choice uses shapes only: a training call of at least 1024 rows takes the
    Triton op, or from 4096 rows, in fp16/bf16 without dropout and at most 3072 features wide, the merged weight
    built per call by one Triton pass over W, with cuBLAS GEMMs and the Triton passes for the LoRA gradients).
    ``lora_route`` says which route a call with given arguments takes. Everywhere else (CPU tensors, interpreter
    or not; float64; no Triton; a call with a tensor that spans, or an output or workspace that holds, 2**31
    elements or more, past the kernels' 32-bit offsets) the reference.

Which backend runs, first match wins:
  1. the call's ``backend=``;
  2. the innermost ``with use_backend(name):``;
  3. ``set_backend(name)``;
  4. the environment variable ``MINIPEFT_KERNEL``;
  5. ``"auto"``.

The same switch, names and precedence serve ``multi_lora_linear``, a batch whose rows each use their own adapter
(punica's SGMV, https://arxiv.org/abs/2310.18547): kernels/reference.py's loop over adapters, or the segmented
kernels of kernels/multi_lora_triton.py; "auto" takes the Triton kernels on CUDA (where their 32-bit offsets reach
every element), the reference elsewhere.
``multi_lora_linear_packed`` is the same with the adapters packed once (``pack_adapters``) and the rows grouped
once (``group_rows``), for callers that run many batches, or many layers, on the same adapters or rows; on it,
"auto" on CUDA takes for inference with one adapter per sequence the gathered route of
kernels/multi_lora_routes.py instead (``multi_lora_route`` says which route a call takes).

This package imports only torch and triton, and triton only if it is there: without it ``from minipeft import kernels``
still works and ``available_backends()["triton"]`` says why Triton cannot run.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import reprlib
import sys
import threading
from collections.abc import Iterator, Sequence

import torch

from . import int8_autograd, multi_lora_routes, nf4_autograd, reference
from .limits import NF4_BLOCKSIZES, OFFSET_LIMIT, too_large
from .nf4_reference import nf4_dequantize_reference
from .reference import PackedAdapters
from .triton_interpreter import INTERPRETING as _INTERPRETING  # TRITON_INTERPRET, read once for the package

try:  # Triton is optional: the reference backend needs torch alone.
    from . import int8_triton, lora_routes, lora_triton, multi_lora_triton, nf4_lora_triton, nf4_merge_triton
    from .nf4_triton import nf4_dequantize_triton

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a Triton that fails at import on this platform
    lora_triton = lora_routes = nf4_lora_triton = multi_lora_triton = int8_triton = None  # type: ignore[assignment]
    nf4_merge_triton = None  # type: ignore[assignment]
    nf4_dequantize_triton = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = f"triton cannot be imported ({type(e).__name__}: {e})"

__all__ = ["lora_linear", "lora_route", "set_backend", "use_backend", "get_backend", "available_backends", "BACKENDS",
           "nf4_dequantize_reference", "nf4_dequantize_triton", "nf4_dequantize", "nf4_linear", "nf4_lora_linear",
           "nf4_lora_route", "multi_lora_linear", "multi_lora_linear_packed", "multi_lora_route", "pack_adapters",
           "group_rows", "gather_adapters", "PackedAdapters", "int8_linear", "int8_dequantize"]

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "MINIPEFT_KERNEL"

_global_backend: str | None = None  # set_backend(...)
# use_backend(...) stack, one per thread, so threads never see each other's choice. A threading.local and not
# a ContextVar: torch.compile (Dynamo) reads a threading.local while tracing, but a ContextVar breaks the graph.
_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "backends"):
        _local.backends = []
    return _local.backends


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; expected one of {list(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Choose the backend for every later call: "reference" | "triton" | "auto"; None clears the choice."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` inside the ``with`` block; blocks nest, the innermost wins."""
    stack = _stack()
    stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        stack.pop()


def get_backend() -> str:
    """The backend name in force (before "auto" is resolved against a call's tensors); call's backend= aside."""
    stack = _stack()
    if stack:
        return stack[-1]
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env.strip().lower(), f"environment variable {ENV_VAR}")
    return "auto"


def _triton_unavailable(device: torch.device | None, dtype: torch.dtype | None) -> str | None:
    """Why the Triton backend cannot run on tensors of this device and dtype; None if it can."""
    if lora_triton is None:
        return _TRITON_IMPORT_ERROR
    if _INTERPRETING:
        if dtype == torch.bfloat16:
            return "bf16 tl.dot gives wrong results in the Triton interpreter (TRITON_INTERPRET=1); use fp16/fp32"
    elif device is None:
        if not torch.cuda.is_available():
            return "no CUDA device, and TRITON_INTERPRET=1 was not set before `import minipeft`"
    elif device.type != "cuda":
        return (f"tensors are on {device.type!r}; Triton needs CUDA tensors, or TRITON_INTERPRET=1 set "
                "before `import minipeft` to run CPU tensors through the interpreter")
    if dtype is not None and dtype not in lora_triton.SUPPORTED_DTYPES:
        names = [str(d).removeprefix("torch.") for d in lora_triton.SUPPORTED_DTYPES]
        return f"dtype {dtype} is not supported by the Triton kernels (supported: {names})"
    return None


def available_backends() -> dict[str, str]:
    """{"reference": "ok", "triton": "ok" or the reason it cannot run here}."""
    return {"reference": "ok", "triton": _triton_unavailable(None, None) or "ok"}


def _describe(value: object) -> str:
    """What was given, short enough for an error message: "str 'abc'", "Tensor of shape (2, 3)", "float nan"."""
    if isinstance(value, torch.Tensor):
        return f"Tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _finite(scaling: numbers.Real) -> bool:
    """True unless scaling is NaN, ±inf, or an int too large for a float (it would become inf at dispatch)."""
    try:
        return math.isfinite(scaling)
    except OverflowError:  # math.isfinite converts an int to float first: 10**400 does not fit
        return False


def _check_scaling(scaling: object, name: str = "scaling") -> None:
    """scaling multiplies every LoRA output and gradient: a NaN or inf here poisons the whole model silently.

    A tensor is refused too, even with one element: reading it back is a host sync on a GPU, and the Triton
    backend takes scaling as a plain number, so a scaling that requires grad would get a gradient from one
    backend and none from the other. ``float(t)`` says what is meant.
    """
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        hint = "; for a one-element tensor t pass float(t)" if isinstance(scaling, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number such as lora_alpha / r (a Python float), "
                        f"got {_describe(scaling)}{hint}")
    if not _finite(scaling):
        raise ValueError(f"{name} must be finite (a real number such as lora_alpha / r), got {_describe(scaling)}")


def _check_x_and_weight(x, weight, named) -> tuple[int, int]:
    """x floating, every (name, tensor) of ``named`` (None skipped) in x's dtype and on x's device, and x (..., in)
    fitting weight (out, in); returns (out, in)."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"x has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)")
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors must share x's dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out, in), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., {in_features}) to match "
                         f"weight (out, in) = {tuple(weight.shape)}")
    return out_features, in_features


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_mask) -> None:
    """Check the public boundary: types, dtypes, devices and shapes, with messages that say what was expected."""
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B,
             "dropout_mask": dropout_mask}
    for name, t in named.items():
        if t is None and name in ("bias", "dropout_mask"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_scaling(scaling)
    out_features, in_features = _check_x_and_weight(x, weight, named.items())
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}; expected (r, {in_features}) with r >= 1 "
                         f"to match weight (out, in) = {tuple(weight.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; expected (out, r) = ({out_features}, {r}) "
                         f"from weight {tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},)")
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask has shape {tuple(dropout_mask.shape)}; expected x's shape "
                         f"{tuple(x.shape)}")


_FLOAT_MAX = sys.float_info.max  # an int compares with it exactly


def _looks_valid(x, weight, bias, lora_A, lora_B, scaling, dropout_mask) -> bool:
    """The common case in few attribute reads: True means every check of ``_validate`` passes.

    False means "ask ``_validate``", which raises with a message that names the problem.
    """
    tensor = torch.Tensor
    if not (isinstance(x, tensor) and isinstance(weight, tensor) and isinstance(lora_A, tensor)
            and isinstance(lora_B, tensor)):
        return False
    ws = weight.shape
    return (weight.dtype is x.dtype and weight.device == x.device and len(ws) == 2
            and _adapter_looks_valid(x, ws[0], ws[1], bias, lora_A, lora_B, scaling, dropout_mask))


def _adapter_looks_valid(x, out_features: int, in_features: int, bias, lora_A, lora_B, scaling, dropout_mask) -> bool:
    """``_looks_valid`` past the weight (x, bias, the adapter, scaling, the mask) for a weight (out, in) in x's dtype
    on x's device; x, lora_A and lora_B already known to be tensors."""
    if type(scaling) is float:
        if not math.isfinite(scaling):
            return False
    elif type(scaling) is not int or abs(scaling) > _FLOAT_MAX:  # an int past float's range would round to inf
        return False
    dt = x.dtype
    if not dt.is_floating_point or lora_A.dtype is not dt or lora_B.dtype is not dt:
        return False
    dev = x.device
    if lora_A.device != dev or lora_B.device != dev:
        return False
    As, xs = lora_A.shape, x.shape
    if len(As) != 2 or not xs or xs[-1] != in_features or As[1] != in_features or As[0] < 1:
        return False
    if lora_B.shape != (out_features, As[0]):
        return False
    if not _bias_looks_valid(x, bias, out_features):
        return False
    if dropout_mask is not None and (not isinstance(dropout_mask, torch.Tensor) or dropout_mask.dtype is not dt
                                     or dropout_mask.device != dev or dropout_mask.shape != xs):
        return False
    return True


def _bias_looks_valid(x: torch.Tensor, bias, out_features: int) -> bool:
    """None, or (out_features,) in x's dtype on x's device."""
    return bias is None or (isinstance(bias, torch.Tensor) and bias.dtype is x.dtype and bias.device == x.device
                            and bias.shape == (out_features,))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ on the chosen backend.

    Args:
        x: (..., in), any leading dims, any strides.
        weight: (out, in), frozen: it never receives a gradient.
        bias: (out,) or None.
        lora_A: (r, in).  lora_B: (out, r).
        scaling: lora_alpha / r (or / sqrt(r) with rsLoRA).
        dropout_mask: None or shaped like x, already scaled by 1/(1-p); it multiplies x on the LoRA branch only.
        backend: "reference" | "triton" | "auto" | None (None: see the module docstring for what each
            promises and for the precedence).
    Returns:
        (..., out) in x's dtype.
    Raises:
        TypeError: a non-tensor argument, an integer dtype, tensors whose dtypes differ from x's, or a
            scaling that is not a real number (a string, a tensor of any size, None, a complex, a bool).
        ValueError: an unknown backend, tensors on different devices, shapes that do not fit together, a
            NaN or infinite scaling, or an explicit "triton" that cannot run on these tensors (the message
            says why).
    """
    # The hot path: a few attribute reads (no host sync, no per-call allocation); the detailed checks run
    # only when something looks off, so that the error names the problem.
    name = get_backend() if backend is None else _check_name(backend, "lora_linear(backend=...)")
    if not _looks_valid(x, weight, bias, lora_A, lora_B, scaling, dropout_mask):
        _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    if name == "triton" or (name == "auto" and x.is_cuda):
        route = _lora_route(name, x.device, x.dtype, _lora_too_large(x, weight, bias, lora_A, lora_B, dropout_mask))
        if route == "triton":
            return lora_triton.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask)
        if route == "routes":
            return lora_routes.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask)
    # "reference", and "auto" off CUDA: the interpreter is for tests that ask for "triton" by name (one LoRA
    # call the size of the default model's c_attn takes ~15 s there).
    return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)


def lora_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
               lora_B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None,
               backend: str | None = None) -> str:
    """What ``lora_linear`` with these arguments would run if called now: "reference" (the PyTorch ops),
    "triton" (kernels/lora_triton.py), or for "auto" on CUDA the route kernels/lora_routes.py picks: "merged",
    "cublas", "unfused", "fused_tma", "merged_train" or "triton" (its table says when each runs). Whether a
    gradient is wanted counts, as in the call (the grad mode, and which tensors require grad), and so does the
    merged-weight cache. Checks the arguments as the call does, and raises where an explicit "triton" could not
    run; runs nothing."""
    name = get_backend() if backend is None else _check_name(backend, "lora_route(backend=...)")
    if not _looks_valid(x, weight, bias, lora_A, lora_B, scaling, dropout_mask):
        _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    if name == "triton" or (name == "auto" and x.is_cuda):
        route = _lora_route(name, x.device, x.dtype, _lora_too_large(x, weight, bias, lora_A, lora_B, dropout_mask))
        if route == "routes":
            return lora_routes.route(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask)
        return route
    return "reference"


def _offsets_reason(what: str | None) -> str | None:
    """Why the Triton kernels cannot take a call that ``limits.too_large`` found ``what`` in; None for None."""
    if what is None:
        return None
    return (f"{what}, too large for the Triton kernels' 32-bit offsets (every tensor must span, and every buffer "
            "hold, fewer than 2**31 elements; the reference backend has no such limit)")


def _lora_too_large(x, weight, bias, lora_A, lora_B, dropout_mask) -> str | None:
    """What of a LoRA call the kernels of kernels/lora_triton.py (the Triton passes of the "auto" routes among
    them) could not reach with 32-bit offsets; None if they reach everything (kernels/limits.py). ``weight``
    None: an NF4 base, whose codes ``_nf4_too_large`` counts."""
    N, K = lora_B.shape[0], x.shape[-1]
    M = math.prod(x.shape[:-1])
    r_pad = max(16, 2 * lora_A.shape[0])  # ≥ the rank the kernels pad to (a power of two ≥ 16)
    # The common case in a few reads: every size below is at most this product, and a contiguous tensor spans
    # its numel, itself one of those sizes (or, for A, B and bias, smaller)
    if (max(M, N, r_pad) * max(K, N, r_pad) < OFFSET_LIMIT and x.is_contiguous()
            and (weight is None or weight.is_contiguous()) and lora_A.is_contiguous() and lora_B.is_contiguous()
            and (bias is None or bias.is_contiguous()) and (dropout_mask is None or dropout_mask.is_contiguous())):
        return None
    return too_large((("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                      ("dropout_mask", dropout_mask)),
                     (("x or dX as (rows, in)", M * K), ("y or dY (rows, out)", M * N),
                      ("G (rows, padded rank)", M * r_pad), ("the sum of dB (out, padded rank)", N * r_pad),
                      ("the sum of dA (padded rank, in)", r_pad * K)))


def _lora_route(name: str, device: torch.device, dtype: torch.dtype, too_big: str | None) -> str:
    """Where a call of backend ``name`` on tensors of this device and dtype goes: "triton" (the kernels),
    "routes" ("auto" on CUDA: kernels/lora_routes.py picks) or "reference"; ``too_big`` is ``_lora_too_large``'s
    answer. An explicit "triton" that cannot run raises a ValueError that says why."""
    why_not = _triton_unavailable(device, dtype) or _offsets_reason(too_big)
    if name == "triton":
        if why_not:
            raise ValueError(f"the triton kernel backend cannot run here: {why_not}")
        return "triton"
    return "routes" if name == "auto" and device.type == "cuda" and why_not is None else "reference"


# --------------------------------------------------------------------------------------------------------
# Mixed-adapter LoRA on the same switch: one batch, one adapter per row (punica's SGMV / S-LoRA idea).
#   "reference": kernels/reference.py's loop over adapters (gather the rows, LoRA, index_add), always.
#   "triton":    kernels/multi_lora_triton.py on every call (cuBLAS for the shared base GEMM, the segmented
#                Triton kernels for every adapter's branch, forward and backward), or a ValueError saying why
#                it cannot run (the reasons of ``lora_linear``'s "triton").
#   "auto":      on CUDA the Triton kernels (no host sync: the rows are grouped on the device); and, for
#                ``multi_lora_linear_packed``, inference with one adapter per sequence (adapter_index (B,) for x
#                (B, L, in)) takes the "gathered" route of kernels/multi_lora_routes.py instead (each sequence's
#                adapter gathered once, then two batched cuBLAS GEMMs: 3 launches a layer, as one adapter's).
#                The reference elsewhere, the CPU included. ``multi_lora_route`` says which route a call takes.
# adapter_index is one adapter per row (shaped x.shape[:-1]) or, for x (B, ..., in), one per sequence ((B,)).
# --------------------------------------------------------------------------------------------------------
def _capturing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on x's device (a host sync would end the capture)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_adapter_lists(lora_As, lora_Bs, scalings) -> None:
    """n ≥ 1 adapters as lists: the same number of A's, B's and scalings, tensors, finite real scalings."""
    for name, seq in (("lora_As", lora_As), ("lora_Bs", lora_Bs), ("scalings", scalings)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple with one entry per adapter, got {_describe(seq)}")
    n = len(lora_As)
    if n == 0:
        raise ValueError("lora_As is empty: multi_lora_linear needs at least one adapter (with none, call "
                         "torch.nn.functional.linear)")
    if len(lora_Bs) != n or len(scalings) != n:
        raise ValueError(f"lora_As, lora_Bs and scalings must have one entry per adapter, got lengths {n}, "
                         f"{len(lora_Bs)} and {len(scalings)}")
    for name, t in _named_adapters(lora_As, lora_Bs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    for i, scaling in enumerate(scalings):
        _check_scaling(scaling, f"scalings[{i}]")


def _named_adapters(lora_As, lora_Bs) -> list[tuple[str, object]]:
    return [(f"lora_As[{i}]", A) for i, A in enumerate(lora_As)] + [(f"lora_Bs[{i}]", B) for i, B in enumerate(lora_Bs)]


def _check_adapter_tensors(lora_As, lora_Bs, like: torch.Tensor, like_name: str, in_features: int,
                           out_features: int, fits: str) -> None:
    """Every A_i (r_i, in_features) with r_i ≥ 1 and B_i (out_features, r_i), in the dtype and on the device of
    ``like`` (named ``like_name`` in the messages); ``fits`` says where in and out come from."""
    for name, t in _named_adapters(lora_As, lora_Bs):
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; all tensors must share "
                            f"{like_name}'s dtype")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; all tensors must be on "
                             "one device")
    for i, (A, B) in enumerate(zip(lora_As, lora_Bs, strict=True)):
        if A.dim() != 2 or A.shape[1] != in_features or A.shape[0] < 1:
            raise ValueError(f"lora_As[{i}] has shape {tuple(A.shape)}; expected (r, {in_features}) with r >= 1 "
                             f"to match {fits}")
        if B.dim() != 2 or tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(f"lora_Bs[{i}] has shape {tuple(B.shape)}; expected (out, r) = ({out_features}, "
                             f"{A.shape[0]}) from {fits} and lora_As[{i}] {tuple(A.shape)}")


def _check_index(x, adapter_index, n: int, check_index: bool) -> None:
    """adapter_index int64, shaped x.shape[:-1] (per row) or x.shape[:1] (per sequence), on x's device; its values
    in [-1, n) unless ``check_index`` is False. The value check reads them back (a host sync), so it is skipped
    while torch.compile traces or a CUDA graph is captured. Unchecked, an index outside [-1, n) is memory-safe on
    every route: its row matches no adapter and gets the base layer only."""
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index has dtype {adapter_index.dtype}; expected torch.int64 (torch.long)")
    if adapter_index.shape != x.shape[:-1] and (x.dim() < 2 or adapter_index.shape != x.shape[:1]):
        raise ValueError(f"adapter_index has shape {tuple(adapter_index.shape)}; expected x's leading shape "
                         f"{tuple(x.shape[:-1])} (one adapter per row of x) or {tuple(x.shape[:1])} (one per "
                         "sequence)")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but x is on {x.device}; move it to x's device")
    if not check_index or torch.compiler.is_compiling() or _capturing(x) or adapter_index.numel() == 0:
        return
    if bool(((adapter_index < -1) | (adapter_index >= n)).any()):  # the one host sync of this check
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        raise ValueError(f"adapter_index values must lie in [-1, {n}): -1 for the base layer alone, i for "
                         f"adapter i (there are {n} adapters); got values from {lo} to {hi}")


def _check_tensors(x, weight, bias, adapter_index) -> None:
    for name, t in (("x", x), ("weight", weight), ("adapter_index", adapter_index)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be None or a torch.Tensor, got {_describe(bias)}")


def _validate_multi(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index, check_index: bool = True) -> None:
    """``multi_lora_linear``'s boundary: types, dtypes, devices and shapes, with messages naming the argument."""
    _check_tensors(x, weight, bias, adapter_index)
    _check_adapter_lists(lora_As, lora_Bs, scalings)
    out_features, in_features = _check_x_and_weight(x, weight, [("weight", weight), ("bias", bias)])
    _check_adapter_tensors(lora_As, lora_Bs, x, "x", in_features, out_features,
                           f"weight (out, in) = {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},)")
    _check_index(x, adapter_index, len(lora_As), check_index)


def _multi_too_large(x, ranks, a_cat, b_cat) -> str | None:
    """What of a mixed-adapter call the segmented kernels (kernels/multi_lora_triton.py) could not reach with 32-bit
    offsets; None if they reach everything (kernels/limits.py). ``ranks``: the adapters' r_i; a_cat (Σr, in) and
    b_cat (out, Σr): the packed adapters, or the lists of A's and B's (the call packs them contiguously: counted by
    their sizes).

    The kernels reach the rows of x, y, dY and dX through the sorted row index, in 64-bit offsets; what they index
    in 32 bits is a row's columns, S and dS (rows, largest rank), the stacked factors and the sums of dA and dB
    (Σr · in, out · Σr). The base GEMMs are cuBLAS's; dY's columns are made contiguous in backward, where a
    transposed dY can arrive and nothing could be checked at the forward."""
    packed = isinstance(a_cat, torch.Tensor)
    N, K = (b_cat if packed else b_cat[0]).shape[0], x.shape[-1]
    M = math.prod(x.shape[:-1])
    sum_r, max_r = sum(ranks), max(ranks)
    try:  # the kernels read x.reshape(M, K): a view keeps x's column stride, a copy has stride 1
        x_col_stride = abs(x.view(M, K).stride(-1))
    except RuntimeError:
        x_col_stride = 1
    tensors = (("adapters.a_cat", a_cat), ("adapters.b_cat", b_cat)) if packed else ()
    if (max(M, N, sum_r) * max(K, N, sum_r) < OFFSET_LIMIT and x_col_stride == 1
            and all(t.is_contiguous() for _, t in tensors)):
        return None  # the common case in a few reads, as in ``_lora_too_large``
    return too_large(tensors, (("a row of x", 1 + (K - 1) * x_col_stride),
                               (f"S or dS (x's {M} rows × the largest rank, {max_r})", M * max_r),
                               (f"the stacked A's or dA (Σr = {sum_r} × in = {K})", sum_r * K),
                               (f"the stacked B's or dB (out = {N} × Σr = {sum_r})", N * sum_r)))


def _multi_route(name: str, x: torch.Tensor, adapter_index: torch.Tensor, adapters: PackedAdapters | None,
                 needs_grad: bool, too_big: str | None) -> str:
    """"reference", "triton" or "gathered" for backend ``name`` on these tensors; an explicit "triton" that cannot
    run raises. ``adapters`` None (unpacked adapters): the gathered route, which gathers from a packing, is not
    considered. ``too_big``: ``_multi_too_large``'s answer (the gathered route, torch ops, has no such limit)."""
    if name == "triton":
        why_not = _triton_unavailable(x.device, x.dtype) or _offsets_reason(too_big)
        if why_not:
            raise ValueError(f"the triton kernel backend cannot run here: {why_not}")
        return "triton"
    if name != "auto" or not x.is_cuda or x.dtype not in multi_lora_routes.DTYPES:
        return "reference"
    if adapters is not None and multi_lora_routes.choose_route(x, adapter_index, adapters, needs_grad) == "gathered":
        return "gathered"
    return "triton" if _triton_unavailable(x.device, x.dtype) is None and too_big is None else "reference"


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _per_row(x: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
    """The index per row of x (x.shape[:-1]): a per-sequence index (B,) expanded (a view, no copy)."""
    if adapter_index.shape == x.shape[:-1]:
        return adapter_index
    return adapter_index.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_index: torch.Tensor,
    backend: str | None = None,
    *,
    check_index: bool = True,
) -> torch.Tensor:
    """y[m] = x[m]·Wᵀ + bias + s_i·(x[m]·A_iᵀ)·B_iᵀ with i = adapter_index[m] (the base alone where i = -1).

    Args:
        x: (..., in), any leading dims, any strides.
        weight: (out, in), frozen: it never receives a gradient.
        bias: (out,) or None.
        lora_As: a list or tuple of n tensors (r_i, in); the ranks r_i may differ.
        lora_Bs: n tensors (out, r_i).
        scalings: n real numbers s_i (lora_alpha / r_i, or / sqrt(r_i) with rsLoRA).
        adapter_index: int64 of shape x.shape[:-1], values in [-1, n): each row's adapter, -1 for none; or, for
            x (B, ..., in), of shape (B,): one adapter for every row of sequence b.
        backend: "reference" | "triton" | "auto" | None, as for ``lora_linear`` (see the comment above).
        check_index: False skips the check of adapter_index's values, a host sync (a GPU decode step of a
            12-layer model with every Linear adapted would wait for the GPU 48 times), for a caller that made
            the index itself: a PeftModel's mixed batch, whose names were checked once for the whole model.
    Returns:
        (..., out) in x's dtype. Gradients reach x, every A_i and B_i, and a bias that requires one.
    Raises:
        TypeError: a non-tensor, a sequence that is not a list or tuple, an integer dtype for x, tensors whose
            dtype differs from x's, a scaling that is not a real number, an adapter_index that is not int64.
        ValueError: an unknown backend; sequences of different lengths (or none); shapes that do not fit;
            tensors on another device; a NaN or infinite scaling; adapter_index values outside [-1, n) (not
            checked while torch.compile traces or a CUDA graph is captured: that check syncs with the host);
            an explicit "triton" that cannot run on these tensors (the message says why).
    """
    name = get_backend() if backend is None else _check_name(backend, "multi_lora_linear(backend=...)")
    _validate_multi(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index, check_index)
    adapter_index = _per_row(x, adapter_index)
    ranks = [A.shape[0] for A in lora_As]
    too_big = _multi_too_large(x, ranks, lora_As, lora_Bs) if name != "reference" else None
    if _multi_route(name, x, adapter_index, None, True, too_big) == "triton":
        return multi_lora_triton.multi_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index)
    return reference.multi_lora_linear(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index)


def pack_adapters(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                  scalings: Sequence[float]) -> PackedAdapters:
    """n LoRA adapters of one layer, checked once and packed for ``multi_lora_linear_packed``.

    lora_As: n tensors (r_i, in); lora_Bs: n tensors (out, r_i); scalings: n finite real numbers. Returns
    PackedAdapters(a_cat (Σr, in), b_cat (out, Σr), ranks, scalings). The packing copies the adapters (torch.cat,
    which autograd follows back to each A_i and B_i): a caller that serves many batches packs once and keeps it,
    for as long as the adapters do not change. Raises TypeError / ValueError as ``multi_lora_linear`` does.
    """
    _check_adapter_lists(lora_As, lora_Bs, scalings)
    first_A, first_B = lora_As[0], lora_Bs[0]
    in_features = first_A.shape[1] if first_A.dim() == 2 else -1
    out_features = first_B.shape[0] if first_B.dim() == 2 else -1
    _check_adapter_tensors(lora_As, lora_Bs, first_A, "lora_As[0]", in_features, out_features,
                           f"lora_As[0] {tuple(first_A.shape)} and lora_Bs[0] {tuple(first_B.shape)}")
    if not first_A.dtype.is_floating_point:
        raise TypeError(f"lora_As[0] has dtype {first_A.dtype}; expected a floating dtype")
    return reference.pack_adapters(lora_As, lora_Bs, scalings)


def group_rows(adapter_index: torch.Tensor, n_adapters: int):
    """The rows of a batch grouped by adapter for the Triton kernels (``multi_lora_triton.RowGroups``), made on
    the device with no host sync; None where Triton cannot be imported (the reference loop needs no grouping).

    It depends only on the index, so a model makes it once per batch and hands it to every layer
    (``multi_lora_linear_packed(..., groups=)``) instead of sorting the rows again in each of them.
    """
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index must be an int64 tensor, got {_describe(adapter_index)}")
    if isinstance(n_adapters, bool) or not isinstance(n_adapters, int) or n_adapters < 1:
        raise ValueError(f"n_adapters must be an int >= 1, got {_describe(n_adapters)}")
    return None if multi_lora_triton is None else multi_lora_triton.group_rows(adapter_index, n_adapters)


def gather_adapters(adapters: PackedAdapters, adapter_index: torch.Tensor):
    """Each sequence's adapter copied out of the packing, for the gathered route (kernels/multi_lora_routes.py):
    ``GatheredAdapters`` of (B, R, in) and (B, R, out) from a per-sequence index (B,), R the largest rank.

    It depends only on the packing and the index, so a caller that runs several calls on one batch (the layers'
    decode steps of a generate) gathers once and passes it to each (``multi_lora_linear_packed(..., gathered=)``).
    """
    _check_packed(adapters)
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype != torch.int64 or adapter_index.dim() != 1:
        raise TypeError(f"adapter_index must be a 1-D int64 tensor (one adapter per sequence), got "
                        f"{_describe(adapter_index)}")
    if adapter_index.device != adapters.a_cat.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but the adapters are on "
                         f"{adapters.a_cat.device}; move it to their device")
    return multi_lora_routes.gather_adapters(adapters, adapter_index)


def _check_packed(adapters: object) -> None:
    if not isinstance(adapters, PackedAdapters):
        raise TypeError(f"adapters must be the PackedAdapters that kernels.pack_adapters returns, got "
                        f"{_describe(adapters)}")


def _check_gathered(gathered: object, x: torch.Tensor, adapters: PackedAdapters, in_features: int,
                    out_features: int) -> None:
    """gathered: ``gather_adapters(adapters, index)`` for x's B sequences — its shapes, dtype and device (what can
    be checked without reading values; that it was gathered from this very index is the caller's word)."""
    B, R = x.shape[0], max(adapters.ranks)
    want = ((B, R, in_features), (B, R, out_features))
    if (not isinstance(gathered, multi_lora_routes.GatheredAdapters)
            or (tuple(gathered.a.shape), tuple(gathered.b.shape)) != want
            or gathered.a.dtype != x.dtype or gathered.a.device != x.device):
        got = gathered if not isinstance(gathered, multi_lora_routes.GatheredAdapters) else \
            f"GatheredAdapters of shapes {tuple(gathered.a.shape)} and {tuple(gathered.b.shape)}, " \
            f"{gathered.a.dtype} on {gathered.a.device}"
        raise ValueError(f"gathered must be kernels.gather_adapters(adapters, adapter_index) for this batch: "
                         f"shapes {want[0]} and {want[1]}, {x.dtype} on {x.device}; got {got}")


def multi_lora_linear_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: PackedAdapters,
    adapter_index: torch.Tensor,
    backend: str | None = None,
    *,
    groups=None,
    gathered=None,
    check_index: bool = True,
) -> torch.Tensor:
    """``multi_lora_linear`` with the adapters packed once (``pack_adapters``) and, optionally, the rows grouped
    once (``group_rows(adapter_index, n)``): the per-call work and checks no longer grow with the number of
    adapters, which is what a decode step of a many-adapter server needs (its host time is most of the step).

    ``groups`` must be made from this very adapter_index, one entry per row (a per-sequence index expanded to
    x.shape[:-1]; it is not checked against it: that would cost what it saves); None groups the rows in the
    call. ``gathered``, the same for the gathered route ("auto", inference, one adapter per sequence):
    ``gather_adapters(adapters, adapter_index)`` of this very index, or None to gather in the call. The rest as
    ``multi_lora_linear``, whose errors it raises for the same mistakes (the adapters' own checks ran in
    ``pack_adapters``).
    """
    name = get_backend() if backend is None else _check_name(backend, "multi_lora_linear_packed(backend=...)")
    _check_tensors(x, weight, bias, adapter_index)
    _check_packed(adapters)
    out_features, in_features = _check_x_and_weight(x, weight, [("weight", weight), ("bias", bias),
                                                                ("adapters.a_cat", adapters.a_cat),
                                                                ("adapters.b_cat", adapters.b_cat)])
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},)")
    sum_r = sum(adapters.ranks)
    if adapters.a_cat.shape != (sum_r, in_features) or adapters.b_cat.shape != (out_features, sum_r):
        raise ValueError(f"adapters.a_cat {tuple(adapters.a_cat.shape)} and adapters.b_cat "
                         f"{tuple(adapters.b_cat.shape)} do not fit weight (out, in) = {tuple(weight.shape)} with "
                         f"ranks {adapters.ranks}: expected ({sum_r}, {in_features}) and ({out_features}, {sum_r})")
    n = len(adapters.ranks)
    _check_index(x, adapter_index, n, check_index)
    if groups is not None and (not isinstance(groups, tuple) or len(groups) != 2
                               or groups[0].order.numel() != math.prod(x.shape[:-1])
                               or groups[0].start.numel() != n + 1):
        raise ValueError(f"groups must be kernels.group_rows(index, {n}) for this adapter_index, one entry per row "
                         f"of x, got {_describe(groups)}")
    too_big = _multi_too_large(x, adapters.ranks, adapters.a_cat, adapters.b_cat) if name != "reference" else None
    route = _multi_route(name, x, adapter_index, adapters, _needs_grad(x, bias, adapters.a_cat, adapters.b_cat),
                         too_big)
    if route == "gathered":
        if gathered is not None:
            _check_gathered(gathered, x, adapters, in_features, out_features)
        return multi_lora_routes.multi_lora_linear_gathered(x, weight, bias, adapters, adapter_index, gathered)
    adapter_index = _per_row(x, adapter_index)
    if route == "triton":
        return multi_lora_triton.multi_lora_linear_packed(x, weight, bias, adapters, adapter_index, groups)
    return reference.multi_lora_linear_packed(x, weight, bias, adapters, adapter_index, groups)


def multi_lora_route(x: torch.Tensor, adapter_index: torch.Tensor, adapters: PackedAdapters,
                     bias: torch.Tensor | None = None, backend: str | None = None) -> str:
    """The route ``multi_lora_linear_packed`` takes for these arguments now: "reference", "triton" (the segmented
    kernels of kernels/multi_lora_triton.py) or "gathered" (kernels/multi_lora_routes.py; "auto" only). Whether
    a gradient is wanted counts, as in the call (the grad mode in force, and which tensors require grad, the
    bias among them). Checks what the choice reads: the types, and adapter_index's dtype, shape and device."""
    name = get_backend() if backend is None else _check_name(backend, "multi_lora_route(backend=...)")
    for arg, t in (("x", x), ("adapter_index", adapter_index), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (arg == "bias" and t is None):
            raise TypeError(f"{arg} must be a torch.Tensor, got {_describe(t)}")
    _check_packed(adapters)
    _check_index(x, adapter_index, len(adapters.ranks), check_index=False)
    too_big = _multi_too_large(x, adapters.ranks, adapters.a_cat, adapters.b_cat) if name != "reference" else None
    return _multi_route(name, x, adapter_index, adapters, _needs_grad(x, bias, adapters.a_cat, adapters.b_cat),
                        too_big)


# --------------------------------------------------------------------------------------------------------
# NF4 on the same switch: dequantization, and the linear layer on an NF4 weight (QLoRA,
# https://arxiv.org/abs/2305.14314). Same names, same precedence (backend= > use_backend > set_backend >
# MINIPEFT_KERNEL > "auto"), and the names make the same promises:
#   "reference": kernels/nf4_reference.py, always.
#   "triton":    the Triton kernel of kernels/nf4_triton.py (the op minipeft::nf4_dequantize_triton) on every
#                call, or a ValueError that says why it cannot run (no Triton; CPU tensors without
#                TRITON_INTERPRET=1; an output dtype other than fp32/fp16/bf16; bf16 in the interpreter, which
#                rounds it wrongly; a weight of 2**31 or more elements, past the kernel's 32-bit offsets).
#   "auto":      that Triton kernel on CUDA wherever it can run (2.8-2.9 TB/s against 129-133 GB/s for the eager
#                reference on an H100: benchmarks/RESULTS.md); the reference everywhere else, the CPU included.
# Every backend takes the state as the kernels index it: flat, contiguous tensors (a strided view is copied, as
# int8_linear copies its codes) and a blocksize that is a power of two from 32 to 4096 (kernels/limits.py).
# ``nf4_linear`` is the layer: y = x·dequantize(W_q)ᵀ + bias through the autograd op of kernels/nf4_autograd.py,
# which saves the 4-bit codes for backward, never the dense weight.
# --------------------------------------------------------------------------------------------------------
NF4_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NF4_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _nf4_triton_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the NF4 Triton kernel cannot dequantize to ``dtype`` on ``device``; None if it can."""
    why = _triton_unavailable(device, None)  # Triton importable, and a CUDA device or the interpreter
    if why:
        return why
    if dtype not in NF4_TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the NF4 Triton kernel (supported: float32, float16, bfloat16)"
    if _INTERPRETING and dtype == torch.bfloat16:
        return ("the Triton interpreter (TRITON_INTERPRET=1) rounds to bf16 differently from the GPU; use "
                "float16/float32 there (the GPU tests check bf16)")
    return None


def _nf4_route(backend: str | None, where: str, device: torch.device, dtype: torch.dtype, numel: int) -> str:
    """The backend name in force, resolved against the tensors of a weight of ``numel`` elements: "reference" or
    "triton"."""
    name = get_backend() if backend is None else _check_name(backend, where)
    why_not = _nf4_triton_unavailable(device, dtype) or _offsets_reason(_nf4_too_large(numel))
    if name == "triton":
        if why_not:
            raise ValueError(f"the triton kernel backend cannot run here: {why_not}")
        return "triton"
    if name == "auto" and device.type == "cuda" and why_not is None:
        return "triton"
    return "reference"


def _nf4_too_large(numel: int) -> str | None:
    """What the NF4 kernels could not reach with 32-bit offsets: the weight's flat index i (kernels/limits.py)."""
    return too_large((), (("the NF4 weight (out · in)", numel),))


def _contiguous(*state: torch.Tensor | None) -> tuple:
    """The NF4 state as every kernel indexes it, flat and contiguous: ``.contiguous()`` returns the tensors
    ``quantize_nf4`` makes as they are, and copies a strided view (``codes[::2]`` read as flat would be wrong)."""
    return tuple(None if t is None else t.contiguous() for t in state)


def _check_nf4_state(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, numel, blocksize,
                     dq_blocksize) -> None:  # fmt: skip
    """The packed state's layout (types, dtypes, lengths, one device) and a blocksize the kernels can tile;
    metadata only, no host sync.

    Its values (finite, ≥ 0 statistics) were checked where the state was made: ``minipeft.quant.quantize_nf4``,
    ``NF4Weight.to`` and ``NF4Linear``'s ``load_state_dict``.
    """
    sizes = {"numel": numel, "blocksize": blocksize, "dq_blocksize": dq_blocksize}
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {_describe(v)}")
    if blocksize not in NF4_BLOCKSIZES:  # the kernels tile whole blocks: tl.arange(0, blocksize // 2)
        raise ValueError(f"blocksize must be a power of two from 32 to 4096 (as quantize_nf4 makes it), got "
                         f"{_describe(blocksize)}")
    double_quant = absmax_scale is not None
    n_blocks = -(-numel // blocksize)
    expected = {"codes": (codes, torch.uint8, ((numel + 1) // 2,)),
                "absmax": (absmax, torch.uint8 if double_quant else torch.float32, (n_blocks,)),
                "nf4_values": (nf4_values, torch.float32, (16,))}  # fmt: skip
    if double_quant:
        expected["absmax_scale"] = (absmax_scale, torch.float32, (-(-n_blocks // dq_blocksize),))
        expected["absmax_offset"] = (absmax_offset, torch.float32, ())
        expected["dq_values"] = (dq_values, torch.float32, (256,))
    elif absmax_offset is not None:
        raise ValueError("absmax_offset is given without absmax_scale; double quantization needs both, plain "
                         "NF4 neither")  # fmt: skip
    for name, (t, dtype, shape) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
        if t.dtype != dtype or t.shape != shape:
            raise ValueError(f"{name} must be {dtype} of shape {shape} for numel={numel}, blocksize={blocksize}, "
                             f"dq_blocksize={dq_blocksize}; got {t.dtype} of shape {tuple(t.shape)}")  # fmt: skip
        if t.device != codes.device:
            raise ValueError(f"{name} is on {t.device} but codes is on {codes.device}; all must be on one device")


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    numel: int,
    blocksize: int,
    dq_blocksize: int,
    dtype: torch.dtype,
    backend: str | None = None,
) -> torch.Tensor:
    """The flat ``(numel,)`` dequantized weight in ``dtype`` on the chosen backend.

    The arguments of ``nf4_dequantize_reference`` (kernels/nf4_reference.py has the math), plus ``backend``:
    "reference" | "triton" | "auto" | None (see the NF4 section's comment for what each promises).
    ``minipeft.quant.dequantize_nf4(q)`` is the friendly form, on an ``NF4Weight``.

    Raises:
        TypeError: a state argument that is not a tensor, or a ``dtype`` that is not a torch.dtype.
        ValueError: an unknown backend; a state whose dtypes, lengths or devices do not fit ``numel`` and
            ``blocksize``; an output dtype other than float32/bfloat16/float16/float64; an explicit "triton"
            that cannot run here (the message says why).
    """
    _check_nf4_state(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, numel, blocksize,
                     dq_blocksize)  # fmt: skip
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {_describe(dtype)}")
    if dtype not in _NF4_OUT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    route = _nf4_route(backend, "nf4_dequantize(backend=...)", codes.device, dtype, numel)
    state = _contiguous(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    return nf4_autograd.dequantize(route, *state, numel, blocksize, dq_blocksize, dtype)


def _check_nf4_layer(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, out_features,
                     in_features, blocksize, dq_blocksize) -> None:  # fmt: skip
    """The checks of ``nf4_linear``'s arguments (``nf4_lora_linear`` makes them too): a well-formed call passes in
    a few attribute reads (a decode step's host time), any other goes to ``_check_nf4_layer_fully``, whose error
    names the problem."""
    if not (isinstance(x, torch.Tensor) and _bias_looks_valid(x, bias, out_features)
            and _nf4_looks_valid(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, out_features,
                                 in_features, blocksize, dq_blocksize)):
        _check_nf4_layer_fully(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias,
                               out_features, in_features, blocksize, dq_blocksize)


def _check_nf4_layer_fully(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, out_features,
                           in_features, blocksize, dq_blocksize) -> None:  # fmt: skip
    """``_check_nf4_layer``'s checks one by one, each error naming its argument."""
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {_describe(v)}")
    _check_nf4_state(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, out_features * in_features,
                     blocksize, dq_blocksize)  # fmt: skip
    _check_layer_input(x, bias, out_features, in_features, codes.device, "NF4")


def _check_layer_input(x, bias, out_features: int, in_features: int, device: torch.device, kind: str) -> None:
    """A quantized layer's input: x (..., in) floating, on the codes' device; bias None or (out,) in x's dtype
    on the same device. ``kind`` names the codes in the messages ("NF4", "int8")."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {_describe(x)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., {in_features}) to match the weight "
                         f"(out, in) = ({out_features}, {in_features})")  # fmt: skip
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the {kind} codes are on {device}; move them together")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be None or a torch.Tensor, got {_describe(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; pass bias.to(x.dtype)")
        if bias.shape != (out_features,) or bias.device != x.device:
            raise ValueError(f"bias must have shape ({out_features},) on {x.device}, got {tuple(bias.shape)} on "
                             f"{bias.device}")  # fmt: skip


def nf4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    dq_blocksize: int,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias, Ŵ the ``(out_features, in_features)`` NF4 weight dequantized to x's dtype.

    x (..., in) → y (..., out). Gradients reach x and a bias that requires one; backward dequantizes Ŵ again
    instead of keeping it (kernels/nf4_autograd.py). The dequantization runs on the chosen backend.

    Raises:
        TypeError: x is not a floating tensor; a state argument is not a tensor; bias is not a tensor in x's dtype.
        ValueError: x, bias or the state do not fit ``(out_features, in_features)`` and ``blocksize``, or sit
            on other devices; an unknown backend, or an explicit "triton" that cannot run here.
    """
    _check_nf4_layer(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, out_features,
                     in_features, blocksize, dq_blocksize)  # fmt: skip
    route = _nf4_route(backend, "nf4_linear(backend=...)", x.device, x.dtype, out_features * in_features)
    state = _contiguous(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    return nf4_autograd.nf4_linear_op(x, *state, bias, out_features, in_features, blocksize, dq_blocksize, route)


# "auto" runs the fused NF4 + LoRA kernels for calls of at most this many rows that need no gradient (H100,
# K = N = 4096, × the bf16 linear, autotuned: 2.71 against dequantize-then-cuBLAS's 4.48 at 64 rows, 2.04 against
# 3.03 at 128; at 256 the merged weight's 2.05 against 2.53; RESULTS.md) ...
NF4_FUSED_MAX_ROWS = 128
# ... and above, the merged weight (kernels/nf4_merge_gluon.py, kernels/nf4_merge_triton.py): 2.05 at 256 rows
# against dequantize-then-cuBLAS's 2.48, 1.15 against 1.50 at 4096 (129-255 rows not measured).
NF4_MERGED_MIN_ROWS = NF4_FUSED_MAX_ROWS + 1


def _nf4_fused_pays(x, bias, lora_A, lora_B, in_features: int, blocksize: int) -> bool:
    """Whether "auto" takes the fused NF4 + LoRA kernels for this call (see ``NF4_FUSED_MAX_ROWS``). Whether
    the codes' storage can be read as words is the op's question (``nf4_lora_triton.forward_fits``): it asks
    ``data_ptr()``, which torch.compile cannot trace here."""
    return (x.device.type == "cuda" and x.numel() <= NF4_FUSED_MAX_ROWS * in_features
            and not _needs_grad(x, bias, lora_A, lora_B) and in_features % blocksize == 0
            and _triton_unavailable(x.device, x.dtype) is None and _nf4_triton_unavailable(x.device, x.dtype) is None)


def _nf4_merged_pays(x, bias, lora_A, lora_B, dropout_mask, out_features: int, in_features: int,
                     blocksize: int) -> bool:
    """Whether "auto" runs this QLoRA call on its merged weight: W' = Ŵ + scaling·B·A made from the codes by
    kernels/nf4_merge_triton.py (kernels/nf4_merge_gluon.py for a 16-bit adapter), then one cuBLAS GEMM. For a
    call on CUDA without gradients or a dropout mask, of at least ``NF4_MERGED_MIN_ROWS`` rows, with whole blocks
    per row: the low-rank term's passes over (rows, out) tensors are then gone. (x, A, B and a bias share a
    dtype: ``_validate`` checked it.)"""
    return (x.device.type == "cuda" and dropout_mask is None and x.numel() >= NF4_MERGED_MIN_ROWS * in_features
            and not _needs_grad(x, bias, lora_A, lora_B) and in_features % blocksize == 0
            and _triton_unavailable(x.device, x.dtype) is None and _nf4_triton_unavailable(x.device, x.dtype) is None
            and _nf4_too_large(out_features * in_features) is None)


def _nf4_lora_checked(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, out_features,
                      in_features, blocksize, dq_blocksize, lora_A, lora_B, scaling, dropout_mask, backend,
                      where: str) -> str:
    """The backend name in force, after ``nf4_lora_linear``'s checks of its arguments."""
    name = get_backend() if backend is None else _check_name(backend, where)
    _check_nf4_layer(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, out_features,
                     in_features, blocksize, dq_blocksize)  # fmt: skip
    # a well-formed call in a few attribute reads (with the NF4 checks: 4.8 µs where checking one by one took 12.7
    # on a 2-core CPU), else lora_linear's checks of the adapter against a stand-in for Ŵ's shape (a stride-0
    # view: no memory)
    if not (isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor)
            and _adapter_looks_valid(x, out_features, in_features, bias, lora_A, lora_B, scaling, dropout_mask)):
        _validate(x, x.new_empty(()).expand(out_features, in_features), bias, lora_A, lora_B, scaling, dropout_mask)
    return name


def _nf4_looks_valid(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, out_features,
                     in_features, blocksize, dq_blocksize) -> bool:
    """True means every check of ``_check_nf4_layer_fully`` but the bias's passes (``_bias_looks_valid``); False
    means "ask ``_check_nf4_layer_fully``"."""
    if not (type(out_features) is int and type(in_features) is int and type(blocksize) is int
            and type(dq_blocksize) is int and out_features > 0 and in_features > 0 and dq_blocksize > 0
            and blocksize in NF4_BLOCKSIZES and x.dtype.is_floating_point and x.dim() >= 1
            and x.shape[-1] == in_features):
        return False
    tensor, u8, f32, dev = torch.Tensor, torch.uint8, torch.float32, x.device
    numel = out_features * in_features
    n_blocks = -(-numel // blocksize)
    if not (isinstance(codes, tensor) and codes.dtype is u8 and codes.shape == ((numel + 1) // 2,)
            and codes.device == dev and isinstance(nf4_values, tensor) and nf4_values.dtype is f32
            and nf4_values.shape == (16,) and nf4_values.device == dev and isinstance(absmax, tensor)
            and absmax.shape == (n_blocks,) and absmax.device == dev):
        return False
    if absmax_scale is None:  # plain NF4: fp32 absmax
        return absmax_offset is None and absmax.dtype is f32
    return (absmax.dtype is u8 and isinstance(absmax_scale, tensor) and absmax_scale.dtype is f32
            and absmax_scale.shape == (-(-n_blocks // dq_blocksize),) and absmax_scale.device == dev
            and isinstance(absmax_offset, tensor) and absmax_offset.dtype is f32 and absmax_offset.shape == ()
            and absmax_offset.device == dev and isinstance(dq_values, tensor) and dq_values.dtype is f32
            and dq_values.shape == (256,) and dq_values.device == dev)


def _nf4_lora_fused(name, x, bias, lora_A, lora_B, dropout_mask, out_features, in_features, blocksize) -> bool:
    """Whether backend ``name`` runs this QLoRA call on the fused kernels of kernels/nf4_lora_triton.py; an
    explicit "triton" that cannot run raises a ValueError that says why."""
    fused = name == "triton" or (name == "auto" and _nf4_fused_pays(x, bias, lora_A, lora_B, in_features, blocksize))
    if not fused:
        return False
    # what the fused kernels cannot reach with 32-bit offsets: Ŵ's flat index, the LoRA kernels' tensors
    too_big = _nf4_too_large(out_features * in_features) or _lora_too_large(x, None, bias, lora_A, lora_B,
                                                                            dropout_mask)
    if name == "triton":
        why_not = (_triton_unavailable(x.device, x.dtype) or _nf4_triton_unavailable(x.device, x.dtype)
                   or _offsets_reason(too_big))
        if why_not:
            raise ValueError(f"the triton kernel backend cannot run here: {why_not}")
    return too_big is None


def nf4_lora_route(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    dq_blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> str:
    """What ``nf4_lora_linear`` with these arguments would run if called now: "triton" (the fused kernels of
    kernels/nf4_lora_triton.py), "merged" (the merged weight made from the codes, then one cuBLAS GEMM: what
    "auto" runs on CUDA from ``NF4_MERGED_MIN_ROWS`` rows on without gradients), "dequantize" (the Triton
    dequantization, a cuBLAS GEMM and the low-rank term as torch ops: what "auto" runs on CUDA for training, for
    a batch of more than ``NF4_FUSED_MAX_ROWS`` rows with dropout, and where the fused kernels cannot run: rows
    that do not start on a block, a weight past their 32-bit offsets) or "reference". Whether a gradient is
    wanted counts, as in the call. Checks the arguments as the call does, and raises where an explicit "triton"
    could not run; runs nothing."""
    name = _nf4_lora_checked(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias,
                             out_features, in_features, blocksize, dq_blocksize, lora_A, lora_B, scaling,
                             dropout_mask, backend, "nf4_lora_route(backend=...)")
    if _nf4_lora_fused(name, x, bias, lora_A, lora_B, dropout_mask, out_features, in_features, blocksize):
        return "triton"
    if name == "auto" and _nf4_merged_pays(x, bias, lora_A, lora_B, dropout_mask, out_features, in_features,
                                           blocksize):
        return "merged"
    route = _nf4_route(name, "nf4_lora_route(backend=...)", x.device, x.dtype, out_features * in_features)
    return "dequantize" if route == "triton" else "reference"


def nf4_lora_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    dq_blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ: a LoRA adapter on an NF4 weight (a QLoRA layer).

    The arguments of ``nf4_linear`` then those of ``lora_linear`` (lora_A (r, in), lora_B (out, r), scaling,
    dropout_mask shaped like x). What each backend runs:
      "reference": ``nf4_linear`` on the reference dequantization, plus the reference's low-rank term.
      "triton":    kernels/nf4_lora_triton.py on every call: Triton GEMMs for y and for dX that read the 4-bit
                   codes and dequantize in registers, with the low-rank term in the same launch or, when the
                   forward splits K across programs, in the launch that adds the partial sums; from 1 to
                   ``nf4_rows_gluon.MAX_ROWS`` rows of 16-bit x without dropout on a GPU (no adapter or one of
                   rank ≤ 16, a blocksize that is a multiple of 64), kernels/nf4_rows_gluon.py (mma.sync with
                   the weight operand made in registers, the low-rank term in the same launch; a Gluon kernel,
                   Triton's lower level); from ``nf4_rs_gluon.MIN_ROWS`` rows of 16-bit x on a Hopper GPU (no
                   adapter or one of rank ≤ 32, a blocksize of 64 or more), kernels/nf4_rs_gluon.py (wgmma with
                   Ŵ made from the codes in its operand's registers, the low-rank term and bias in the same
                   launch; Gluon); and for
                   one or two rows without dropout where neither of those can run (fp32, a blocksize of 32),
                   kernels/nf4_decode_triton.py (matrix-vector products on CUDA cores, the low-rank term in the
                   same launch); the LoRA
                   kernels for G, dA and dB (and S, unless the forward's programs make it). A ValueError
                   says why where it cannot run.
      "auto":      on CUDA, the fused kernels for a call without gradients on at most ``NF4_FUSED_MAX_ROWS``
                   rows (a decode step or a short batch: the forward kernel reads the 4-bit codes once, where
                   dequantizing first writes and reads a 16-bit copy of Ŵ); above, without gradients or
                   dropout, the merged weight Ŵ + scaling·B·A made from the codes in one pass
                   (kernels/nf4_merge_triton.py; kernels/nf4_merge_gluon.py for a 16-bit adapter; never
                   cached) and one cuBLAS GEMM; otherwise
                   ``nf4_linear`` with the Triton dequantization and a cuBLAS GEMM, plus the low-rank term as
                   torch ops (benchmarks/RESULTS.md has the routes timed); the reference elsewhere, and for a
                   weight of 2**31 elements or more (past the kernels' 32-bit offsets).
                   ``nf4_lora_route`` says which a call takes.
    Gradients reach x, lora_A, lora_B and a bias that requires one; backward keeps the 4-bit state, never Ŵ.
    """
    name = _nf4_lora_checked(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias,
                             out_features, in_features, blocksize, dq_blocksize, lora_A, lora_B, scaling,
                             dropout_mask, backend, "nf4_lora_linear(backend=...)")
    fused = _nf4_lora_fused(name, x, bias, lora_A, lora_B, dropout_mask, out_features, in_features, blocksize)
    state = _contiguous(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    if fused:
        return nf4_lora_triton.nf4_lora_linear(x, state, bias, lora_A, lora_B, float(scaling), dropout_mask,
                                               out_features, in_features, blocksize, dq_blocksize)
    if name == "auto" and _nf4_merged_pays(x, bias, lora_A, lora_B, dropout_mask, out_features, in_features,
                                           blocksize):
        with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as the other routes compute
            merged = nf4_merge_triton.nf4_merge_op(*state, out_features, in_features, blocksize, dq_blocksize,
                                                   lora_A, lora_B, float(scaling))
            return torch.nn.functional.linear(x, merged, bias)
    y = nf4_linear(x, *state, bias, out_features, in_features, blocksize, dq_blocksize, backend=name)
    x_lora = x if dropout_mask is None else x * dropout_mask
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(x_lora, lora_A), lora_B)


# --------------------------------------------------------------------------------------------------------
# LLM.int8() (https://arxiv.org/abs/2208.07339) on the same switch: the linear layer on a row-wise int8 weight
# with the outlier columns of x in 16 bits (kernels/int8_reference.py has the math), and the dequantization
# that its backward uses. Same names, same precedence, the same promises:
#   "reference": kernels/int8_reference.py, always: torch ops, bit-identical with bitsandbytes.
#   "triton":    the kernels of kernels/int8_triton.py on every call (x scanned and quantized, the int8 GEMM
#                with the rescale and bias in its epilogue, the outlier columns added by a kernel of their
#                own; backward's Ŵ), or a ValueError that says why they cannot run (no Triton; CPU tensors
#                without TRITON_INTERPRET=1; a dtype other than fp32/fp16/bf16; bf16 in the interpreter, whose
#                bf16 tl.dot is wrong; a tensor of 2**31 or more elements, past the kernels' 32-bit offsets).
#   "auto":      those kernels on CUDA wherever they can run, the reference everywhere else (the CPU included).
#                On an H200 (2026-12-04) the reference's dozen passes over (M, in) and (M, out) tensors, the
#                int32 GEMM output among them, took 10.6x the bf16 linear's GPU time at c_attn's shape
#                (7936 x 768 -> 2304, two outlier columns) against the kernels' 1.9x (1.2x with threshold 0),
#                and an 8-bit LoRA training step ran at 0.42x against 0.84x a bf16-base LoRA step
#                (benchmarks/RESULTS.md, "Quantized bases").
# --------------------------------------------------------------------------------------------------------
INT8_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _int8_too_large(x: torch.Tensor | None, codes: torch.Tensor) -> str | None:
    """What the int8 kernels could not reach with 32-bit offsets (kernels/limits.py): x's span in memory, x
    (M, in) and its int8 copy, y (M, out) and the codes (out, in), made contiguous."""
    n, k = codes.shape
    m = 0 if x is None else math.prod(x.shape[:-1])
    return too_large((("x", x),),
                     (("x as (rows, in)", m * k), ("y (rows, out)", m * n), ("the codes (out, in)", n * k)))


def _int8_route(backend: str | None, where: str, device: torch.device, dtype: torch.dtype,
                too_big: str | None = None) -> str:
    """The backend name in force, resolved against the tensors: "reference" or "triton"; ``too_big`` is
    ``_int8_too_large``'s answer."""
    name = get_backend() if backend is None else _check_name(backend, where)
    why_not = _triton_unavailable(device, None) or _offsets_reason(too_big)
    if why_not is None and dtype not in INT8_TRITON_DTYPES:
        why_not = f"dtype {dtype} is not supported by the int8 Triton kernels (supported: float32, float16, bfloat16)"
    if why_not is None and _INTERPRETING and dtype == torch.bfloat16:
        why_not = "bf16 tl.dot gives wrong results in the Triton interpreter (TRITON_INTERPRET=1); use fp16/fp32"
    if name == "triton":
        if why_not:
            raise ValueError(f"the triton kernel backend cannot run here: {why_not}")
        return "triton"
    return "triton" if name == "auto" and device.type == "cuda" and why_not is None else "reference"


def _check_int8_state(codes, absmax) -> None:
    """codes (out, in) int8 and absmax (out,) fp32 on one device; metadata only, no host sync."""
    for name, t in (("codes", codes), ("absmax", absmax)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(t)}")
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D int8 tensor (out, in), got {codes.dtype} of shape {tuple(codes.shape)}")
    if absmax.dtype != torch.float32 or absmax.shape != codes.shape[:1]:
        raise ValueError(f"absmax must be float32 of shape ({codes.shape[0]},), one per row of the codes, got "
                         f"{absmax.dtype} of shape {tuple(absmax.shape)}")  # fmt: skip
    if absmax.device != codes.device:
        raise ValueError(f"absmax is on {absmax.device} but codes is on {codes.device}; keep them together")


def int8_dequantize(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype,
                    backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """Ŵ = code · absmax / 127 as ``(out, in)`` in ``dtype`` on the chosen backend (``minipeft.quant.dequantize_int8``
    is the friendly form, on an ``Int8Weight``).

    Raises:
        TypeError: codes or absmax is not a tensor; dtype is not a torch.dtype.
        ValueError: codes/absmax of the wrong dtype, shape or device; an output dtype other than
            float32/bfloat16/float16/float64; an unknown backend, or an explicit "triton" that cannot run here.
    """
    _check_int8_state(codes, absmax)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {_describe(dtype)}")
    if dtype not in _NF4_OUT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    route = _int8_route(backend, "int8_dequantize(backend=...)", codes.device, dtype, _int8_too_large(None, codes))
    return int8_autograd.dequantize(route, codes.contiguous(), absmax.contiguous(), dtype)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                threshold: float, backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """y = x·Ŵᵀ + bias by LLM.int8()'s decomposition: the input columns holding any |x| ≥ threshold in x's
    dtype, the rest as int8 × int8 with row-wise scales (kernels/int8_reference.py); threshold 0: all in int8.

    Args:
        x: (..., in), floating. codes: (out, in) int8. absmax: (out,) fp32 (``quantize_int8``'s fields).
        bias: (out,) in x's dtype, or None. threshold: a finite number ≥ 0.
        backend: "reference" | "triton" | "auto" | None (see this section's comment).
    Returns:
        (..., out) in x's dtype. Gradients reach x and a bias that requires one; backward dequantizes Ŵ again
        from the codes (kernels/int8_autograd.py), so the step keeps 8 bits per weight, never Ŵ.
    Raises:
        TypeError: a non-tensor, a non-floating x, a bias not in x's dtype.
        ValueError: shapes or devices that do not fit; a negative, NaN or infinite threshold; an unknown backend,
            or an explicit "triton" that cannot run here.
    """
    _check_int8_state(codes, absmax)
    out_features, in_features = codes.shape
    _check_layer_input(x, bias, out_features, in_features, codes.device, "int8")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not _finite(threshold) \
            or threshold < 0:  # fmt: skip
        raise ValueError(f"threshold must be a finite number ≥ 0 (6.0 in LLM.int8(); 0 turns the outlier "
                         f"decomposition off), got {_describe(threshold)}")  # fmt: skip
    route = _int8_route(backend, "int8_linear(backend=...)", x.device, x.dtype, _int8_too_large(x, codes))
    bias = None if bias is None else bias.contiguous()
    return int8_autograd.int8_linear_op(x, codes.contiguous(), absmax.contiguous(), bias, float(threshold), route)
