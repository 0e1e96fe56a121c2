"""Small statistics for verdicts that depend on noise: a mean over seeds with its 95% t-interval, a paired
comparison of two methods over the same seeds, and the Wilson interval of an accuracy.

A score measured once is one draw. Over n seeds with mean x̄ and sample standard deviation s, the 95% interval of
the mean is x̄ ± t₀.₉₇₅,ₙ₋₁ · s / √n (Student's t; 4.30 for 3 seeds, 2.09 for 20, 1.96 only as n grows). Two
methods run on the same seeds are compared by the interval of their paired differences: a verdict ("beats", "is
beaten by") only when that interval excludes 0. An accuracy p on n test examples has the Wilson score interval
(p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.96, which stays inside [0, 1] at p = 0 or 1.
Wilson 1927, https://doi.org/10.1080/01621459.1927.10502953.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Student's t quantile t₀.₉₇₅ for 1-30 degrees of freedom, from the tables; beyond 30, t_975's expansion.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}
Z_975 = 1.959964  # the normal's quantile, t's limit as the degrees of freedom grow


def t_975(dof: int) -> float:
    """Student's t quantile t₀.₉₇₅ with `dof` degrees of freedom: the table up to 30, then the Cornish-Fisher
    expansion around the normal's z, z + (z³ + z)/4ν + (5z⁵ + 16z³ + 3z)/96ν² + (3z⁷ + 19z⁵ + 17z³ − 15z)/384ν³,
    within 1e-4 of the exact value from 31 on (Abramowitz & Stegun 26.7.5)."""
    if dof in T_975:
        return T_975[dof]
    z, v = Z_975, dof
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))
MIN_SEEDS = 3  # fewer seeds give no verdict on a noisy claim


def interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); the half-width is nan for one value."""
    if len(values) == 0:
        raise ValueError("values is empty; expected at least one measurement")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, t_975(n - 1) * statistics.stdev(values) / n ** 0.5


def fmt_interval(values: Sequence[float], spec: str = ".3f") -> str:
    """"mean ± half-width" (the mean alone for one value); spec formats the mean, the half-width has no sign."""
    mean, h = interval(values)
    return f"{mean:{spec}}" if math.isnan(h) else f"{mean:{spec}} ± {h:{spec.lstrip('+')}}"


def compare_verdict(a: Sequence[float], b: Sequence[float], a_name: str, b_name: str, where: str) -> dict:
    """a − b paired over seeds: "beats" when its 95% t-interval lies above 0, "is beaten by" when below, "does not
    beat" when the interval holds 0; no verdict from fewer than MIN_SEEDS seeds.

    Returns {"verdict", "mean", "half_width", "text"}; "text" is the sentence to print.
    """
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, h = interval(diffs)
    if len(diffs) < MIN_SEEDS:
        word, note = "is not compared with", f" (needs >= {MIN_SEEDS} seeds)"
    elif mean - h > 0:
        word, note = "beats", ""
    elif mean + h < 0:
        word, note = "is beaten by", ""
    else:
        word, note = "does not beat", " (the interval holds 0)"
    text = (f"{a_name} {word} {b_name} on {where}{note}: {a_name} − {b_name} = {fmt_interval(diffs, '+.3f')} "
            f"over {len(diffs)} seeds ({fmt_interval(a)} vs {fmt_interval(b)})")
    return {"verdict": word, "mean": mean, "half_width": h, "text": text}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval (low, high) of a proportion p measured on n examples."""
    if n <= 0:
        raise ValueError(f"n must be a positive number of examples, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a proportion in [0, 1], got {p}")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
