"""95 % intervals for accuracies (binomial): shared by the probing and unlearning evaluations.

The core and absorption intervals resample documents/words instead (bootstrap, in their modules).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (Wilson 1927).

    Well-behaved near 0 and 1 (where the normal approximation leaves [0, 1]); ``(nan, nan)`` for ``n = 0``.
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_ci(accuracies: list[float], sizes: list[int]) -> tuple[float, float]:
    """Wilson interval of the pooled accuracy of several test sets (``accuracies[t]`` on ``sizes[t]`` items);
    equal to the interval of their mean when all sizes are equal."""
    n = float(sum(sizes))
    hits = sum(a * s for a, s in zip(accuracies, sizes, strict=True))
    return wilson(hits, n)
