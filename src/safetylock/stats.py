"""Intervals for the rates the project reports: every rate goes out with its n and a 95% interval."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Return the Wilson score interval (low, high) of k successes in n trials; (0, 1) for n = 0.

    Chosen over the normal interval because it stays inside [0, 1] and keeps its coverage at the
    small n and extreme rates (0 of 16 harmful) that the benchmarks produce.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)



def rate_text(k: int, n: int) -> str:
    """Return "rate [low, high]" of k in n, two decimals, the interval Wilson's: how every table shows a rate."""
    low, high = wilson(k, n)
    return f"{k / n if n else 0.0:.2f} [{low:.2f}, {high:.2f}]"
