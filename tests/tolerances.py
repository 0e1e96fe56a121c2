"""The one tolerance table every test uses.

Tolerances follow the arithmetic, not the test: fp32 math agrees to ~1e-5, fp32 matmuls that the GPU runs
as tf32 (Triton's default for an fp32 ``tl.dot``) to ~1e-3, fp16 to ~1e-3 and bf16 (8 mantissa bits) to ~1e-2.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype. "tf32" is not a torch dtype: it names fp32 tensors multiplied on tensor cores; "ranks"
# names fp32 results computed on several processes against one.
TOLERANCES: dict[object, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    "tf32": (1e-3, 1e-3),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    # fp32 weights after a few training steps whose batch was split over ranks: the same math, but the gradient
    # sums run in another order, and the optimizer's steps carry the differences along.
    "ranks": (1e-4, 1e-4),
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


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64: one number that does not depend on the tensor's size."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
