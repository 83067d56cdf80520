"""Binomial intervals against published values (Wilson 1927; e.g. Newcombe 1998, Table I, method 3)."""

from __future__ import annotations

import math

import pytest

from sae.evaluate.intervals import accuracy_ci, wilson


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (81, 263, 0.2553, 0.3662),   # Newcombe 1998, example (a)
    (15, 148, 0.0624, 0.1605),   # example (b)
    (0, 20, 0.0, 0.1611),        # example (c)
    (1, 29, 0.0061, 0.1718),     # example (d)
])
def test_wilson_matches_newcombes_worked_examples(k, n, lo, hi) -> None:
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_pooled_accuracy_interval_and_edge_cases() -> None:
    assert accuracy_ci([0.9, 0.7], [100, 100]) == pytest.approx(wilson(160, 200))
    assert accuracy_ci([1.0, 0.5], [30, 10]) == pytest.approx(wilson(35, 40))
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and 0.69 < lo < 0.73
    assert all(math.isnan(v) for v in wilson(0, 0))
