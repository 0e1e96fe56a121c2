"""Worked solutions to chapter 9's exercises (comparison), checked by the chapter's own checks.

Run from notebooks/:  python solutions/09_comparison.py
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checks.ch09 import check_pick_method, check_separation, check_wilson_interval  # noqa: E402

from minipeft.data import load_task  # noqa: E402


# Exercise 1. The Wilson score interval: the centre is pulled towards 1/2 by z²/2n, and the half-width has a
# z²/4n² term that keeps it open at p = 0 or 1 (the normal approximation p ± z·√(p(1−p)/n) would collapse there).
def wilson_interval(p, n, z=1.96):
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# Exercise 2. Two intervals separate when one's low end is above the other's high end; anything else overlaps.
def separated(p_a, p_b, n):
    (a_lo, a_hi), (b_lo, b_hi) = wilson_interval(p_a, n), wilson_interval(p_b, n)
    if a_lo > b_hi:
        return "above"
    if a_hi < b_lo:
        return "below"
    return None


# Exercise 3. The metric cannot rank methods whose intervals overlap the best one's, so among those the cost
# decides: here the file per task.
def pick_method(rows, n):
    trained = [r for r in rows if r["trainable"]]  # baselines train nothing
    best = max(trained, key=lambda r: r["metric"])
    tied = [r for r in trained if separated(r["metric"], best["metric"], n) != "below"]
    return min(tied, key=lambda r: r["file_bytes"])["method"]


check_wilson_interval(wilson_interval)
check_separation(separated)
results = Path(__file__).resolve().parents[2] / "benchmarks" / "compare" / "results.json"
run = json.loads(results.read_text())
check_pick_method(pick_method, run["rows"], len(load_task(run["meta"]["task"], seed=run["meta"]["seed"]).test))
