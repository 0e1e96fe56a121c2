"""The tolerances every test uses, stated once: element by element (TOLERANCES), and for a whole tensor's relative
error (REL_ERRORS).

Tolerances follow the arithmetic, not the test: fp32 math agrees to ~1e-5, fp32 matmuls that the GPU runs
as tf32 (Triton's default for an fp32 ``tl.dot``) to ~1e-3, fp16 to ~1e-3 and bf16 (8 mantissa bits) to ~1e-2.
Named entries cover comparisons that are not one dtype's rounding; each says why its value is what it is.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype. "tf32" is not a torch dtype: it names fp32 tensors multiplied on tensor cores; the entries
# after bf16 name fp32 comparisons of a kind.
TOLERANCES: dict[object, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    "tf32": (1e-3, 1e-3),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    # fp32 weights after a few training steps whose batch was split over ranks: the same math, but the gradient
    # sums run in another order, and the optimizer's steps carry the differences along.
    "ranks": (1e-4, 1e-4),
    # fp32 logits of one model computed by two implementations (minipeft against transformers or HF peft): the same
    # math in another order of ops (fused addmm, another attention kernel); absolute only, logits are O(1-10).
    "interop": (0.0, 1e-4),
    # fp32 logits after folding W + s·B·A into the weight against the unmerged x·W + s·(x·A)·B: the same math, but
    # the update is rounded into the weight once and every later layer carries the difference along; absolute only.
    "merge": (0.0, 1e-4),
}

# Bounds on rel_error (one number per tensor, see assert_rel_error), for whole results of the GPU kernels against a
# float64 reference on the same inputs: a few roundings stack (an intermediate such as the shrink's S stored in the
# dtype, then the output), each up to the unit roundoff, 2^-11 = 4.9e-4 in fp16 and 2^-8 = 3.9e-3 in bf16. fp32
# and "tf32" as in TOLERANCES.
REL_ERRORS: dict[object, float] = {
    torch.float32: 1e-5,
    "tf32": 1e-3,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
    # fp32 layers quantized to int8 by us and by bitsandbytes, which first rounds the weight and the activations to
    # fp16: a value close to a rounding boundary lands one int8 step (1/127 of its row's absmax) apart.
    "int8-vs-bnb": 1e-2,
}


def tol(dtype: object) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close``."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: object = None, scale: float = 1.0) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's dtype).

    ``scale`` widens both tolerances for results that accumulate over a long reduction (say K=4096 terms):
    pass it explicitly so the reason is visible at the call site.
    """
    rtol, atol = TOLERANCES[actual.dtype if dtype is None else dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, check_dtype=False)


def assert_rel_error(actual: torch.Tensor, expected: torch.Tensor, dtype: object = None, msg: str = "") -> None:
    """rel_error(actual, expected) below REL_ERRORS[dtype] (default: actual's dtype).

    For results checked as one number over a whole tensor (a long reduction, a serving batch on a GPU) rather
    than element by element: a few elements near zero, where a relative bound means little, may be far off.
    """
    bound = REL_ERRORS[actual.dtype if dtype is None else dtype]
    err = rel_error(actual, expected)
    assert err < bound, f"rel_error {err:.3g} >= {bound:g} ({dtype or actual.dtype}) {msg}"


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64: one number that does not depend on the tensor's size."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
