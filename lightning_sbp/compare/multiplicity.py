"""Many comparisons at once: adjusted p-values that keep a whole table's error rate at its level.

A summary table makes dozens of comparisons; tested one by one at 5% each, some of them come out
"beyond seed noise" by chance alone. Each table is therefore one family, and its p-values are
adjusted together:

- ``holm`` (the default): Holm's step-down procedure controls the family-wise error rate, the
  probability of even one false finding in the table, under any dependence between the tests
  (comparisons that share a reference run are dependent).
- ``bh``: Benjamini and Hochberg's step-up procedure controls the false-discovery rate, the expected
  share of false findings among those reported, under independence or positive dependence; it
  finds more when many differences are real.
- ``none``: no adjustment (each comparison at its own level), for a single planned comparison.

A comparison is reported beyond seed noise when its adjusted p-value is below ``1 - confidence``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CORRECTIONS", "adjust", "benjamini_hochberg", "correction_name", "holm"]

CORRECTIONS = ("holm", "bh", "none")
"""The adjustments a grid may ask for (``correction:`` in the grid file, ``--correction``)."""

_NAMES = {
    "holm": "Holm's step-down adjustment (family-wise error rate)",
    "bh": "Benjamini–Hochberg adjustment (false-discovery rate)",
    "none": "no adjustment for multiple comparisons",
}


def correction_name(correction: str) -> str:
    """The adjustment in words, for reports: ``Holm's step-down adjustment (family-wise error rate)``."""
    return _NAMES[correction]


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With ``p_(1) <= ... <= p_(m)`` the sorted p-values, the adjusted value of ``p_(i)`` is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``.
    """
    order = sorted(range(len(p_values)), key=lambda index: p_values[index])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (q-values), in the order given.

    With ``p_(1) <= ... <= p_(m)`` the sorted p-values, the adjusted value of ``p_(i)`` is
    ``min_{j >= i} min(1, m p_(j) / j)``.
    """
    count = len(p_values)
    order = sorted(range(count), key=lambda index: p_values[index], reverse=True)
    adjusted = [1.0] * count
    running = 1.0
    for position, index in enumerate(order):
        rank = count - position
        running = min(running, count * p_values[index] / rank)
        adjusted[index] = running
    return adjusted


def adjust(p_values: Sequence[float], correction: str) -> list[float]:
    """The p-values of one family, adjusted by ``correction`` (one of :data:`CORRECTIONS`).

    Raises:
        ValueError: for an unknown correction or a p-value outside ``[0, 1]``.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}; got {correction!r}")
    values = [float(value) for value in p_values]
    if any(not 0.0 <= value <= 1.0 for value in values):
        raise ValueError(f"p-values must lie in [0, 1], got {values}")
    if correction == "holm":
        return holm(values)
    if correction == "bh":
        return benjamini_hochberg(values)
    return values
