"""Closed-form references for the statistics, written from their textbook definitions.

hf_soups.stats takes the Wilson interval and the exact binomial test from scipy; the tests
check those numbers against these formulas, which share no code with scipy or hf_soups.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist


def wilson_closed_form(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson (1927): centre (k + z^2/2) / (n + z^2), half-width
    z sqrt(n) / (n + z^2) * sqrt(p (1 - p) + z^2 / (4 n)), with p = k / n."""
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n) / (n + z * z) * math.sqrt(p * (1 - p) + z * z / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_closed_form(b: int, c: int) -> float:
    """Exact McNemar: 2 P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1, in exact rationals."""
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, j) for j in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))
