"""Small helpers for the checks at the public boundary, where a bad value gets a message naming it.

A number is accepted only when it is finite, and Python makes two corners of that awkward. `math.isfinite`
raises OverflowError for an int too large for a float (10**400) instead of answering False, and `repr` raises
ValueError for an int of more than 4300 digits (Python's guard against quadratic int-to-str conversion), so the
error message meant for such a value would itself fail. `is_finite` and `shown` answer for both:

    is_finite(10**400) → False          shown(10**5000) → "an int of 16610 bits"

`finite_real` is the whole check of one real-number argument (a weight, a coefficient): its type, then its value.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_finite(value: float) -> bool:
    """math.isfinite, where an int too large for a float counts as not finite instead of raising."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def shown(value: object) -> str:
    """repr(value), or what the value is where repr refuses (an int past 4300 digits, a Fraction of one)."""
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"an int of {value.bit_length()} bits"
        return f"a {type(value).__name__} too long to print"


def finite_real(value: Any, name: str) -> float:
    """`value` as a float: a real number (a Python or numpy scalar, a 0-d floating tensor) that is finite. A
    TypeError (a str, a bool, a list) or a ValueError (NaN, ±inf, 10**400) naming `name` otherwise."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "is_floating_point", None)) \
            and value.is_floating_point():
        value = value.item()  # a 0-d torch tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {shown(value)}")
    if not is_finite(value):
        raise ValueError(f"{name} must be finite, got {shown(value)}")
    return float(value)
