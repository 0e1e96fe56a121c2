"""Small statistics for verdicts that depend on noise: a mean over seeds with its 95% t-interval, a paired
comparison of two methods over the same seeds, and the Wilson interval of an accuracy.

A score measured once is one draw. Over n seeds with mean x̄ and sample standard deviation s, the 95% interval of
the mean is x̄ ± t₀.₉₇₅,ₙ₋₁ · s / √n (Student's t; 4.30 for 3 seeds, 1.96 only as n grows). Two methods run on the
same seeds are compared by the interval of their paired differences: a verdict ("beats", "is beaten by") only
when that interval excludes 0. An accuracy p on n test examples has the Wilson score interval
(p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), z = 1.96, which stays inside [0, 1] at p = 0 or 1.
Wilson 1927, https://doi.org/10.1080/01621459.1927.10502953.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Student's t quantile t₀.₉₇₅ for 1-10 degrees of freedom (beyond that within 4% of the normal's 1.96).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
MIN_SEEDS = 3  # fewer seeds give no verdict on a noisy claim


def interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); the half-width is nan for one value."""
    if len(values) == 0:
        raise ValueError("values is empty; expected at least one measurement")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, T_975.get(n - 1, 1.96) * statistics.stdev(values) / n ** 0.5


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
