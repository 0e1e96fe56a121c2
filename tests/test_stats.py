"""minipeft.stats against explicit formulas, known values and scipy's Student's t."""

from __future__ import annotations

import math
import statistics

import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

from minipeft.stats import compare_verdict, fmt_interval, interval, wilson


def test_interval_of_three_values_uses_students_t():
    mean, h = interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert h == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # s = 1, t(0.975, 2) = 4.303


def test_one_value_has_no_interval_and_empty_is_refused():
    assert math.isnan(interval([0.5])[1])
    assert fmt_interval([0.5]) == "0.500"
    with pytest.raises(ValueError, match="values is empty"):
        interval([])


# 2-40 values: 1-39 degrees of freedom, through stats' printed table of t and past it. The table gives t to 3 decimals
# (t >= 2.04 there: at most 0.0005 / 2.04 = 2.5e-4 relative), its expansion beyond to 1e-4.
@given(st.integers(2, 40).flatmap(lambda n: st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
def test_interval_is_the_mean_plus_minus_students_t_times_the_standard_error(values):
    mean, h = interval(values)
    n = len(values)
    assert mean == pytest.approx(statistics.fmean(values))
    expected = scipy.stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    assert h == pytest.approx(expected, rel=2.5e-4, abs=1e-12)  # abs: all values equal gives s = 0


def test_compare_verdict_needs_an_interval_that_excludes_zero():
    assert compare_verdict([0.9, 0.91, 0.92], [0.5, 0.52, 0.49], "a", "b", "t")["verdict"] == "beats"
    assert compare_verdict([0.5, 0.52, 0.49], [0.9, 0.91, 0.92], "a", "b", "t")["verdict"] == "is beaten by"
    assert compare_verdict([0.5, 0.9, 0.1], [0.5, 0.5, 0.5], "a", "b", "t")["verdict"] == "does not beat"
    few = compare_verdict([0.9, 0.9], [0.1, 0.1], "a", "b", "t")
    assert few["verdict"] == "is not compared with" and "needs >= 3 seeds" in few["text"]


@pytest.mark.parametrize("p,n", [(0.0, 24), (1.0, 24), (0.5, 96), (0.73, 200)])
def test_wilson_matches_its_formula_and_stays_in_0_1(p, n):
    z = 1.96
    low, high = wilson(p, n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((max(0, centre - half), min(1, centre + half)))
    assert 0 <= low <= p <= high <= 1


def test_wilson_half_width_at_96_questions_is_about_a_tenth():
    low, high = wilson(0.5, 96)
    assert (high - low) / 2 < 0.1
    low, high = wilson(0.5, 24)
    assert (high - low) / 2 > 0.18


def test_wilson_refuses_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        wilson(0.5, 0)
    with pytest.raises(ValueError, match="p must be"):
        wilson(1.5, 10)
