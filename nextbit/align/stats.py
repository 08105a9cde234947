"""How much a rate measured on a few items can be trusted: the Wilson score interval of a proportion.

    wilson(k, n)          -> (low, high)   the 95% interval of a rate of k successes in n trials
    wilson(k, n, z=2.576) -> (low, high)   99%

`k` may be fractional (a win rate that counts ties half). Wilson's interval stays inside [0, 1] and is honest at
small n and at rates near 0 or 1, where the normal approximation (p +- z sqrt(p(1-p)/n)) is not. With n = 0 it is
(0, 1): nothing is known. The reward model's held-out accuracy and `nextbit loop`'s win rates print it beside the
count they come from.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal
WIDE = 0.3  # an interval wider than this says the figure is too coarse to read much into (about n < 40 at 0.5)


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high): the Wilson score interval of the proportion k / n at the confidence of `z` (95% by default)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def rate_interval(rate: float, n: int) -> tuple[float, float]:
    """The 95% interval of a rate measured on n items (the rate times n, rounding aside, is the count)."""
    return wilson(min(max(rate * n, 0.0), n), n)


def rate_note(rate: float, n: int, unit: str) -> str:
    """`rate` with its count and 95% interval, as printed: "0.667 on 3 pairs (95% interval 0.21-0.94)"."""
    lo, hi = rate_interval(rate, n)
    return f"{rate:.3f} on {n} {unit} (95% interval {lo:.2f}-{hi:.2f})"


def too_few(rate: float, n: int) -> bool:
    """Whether a rate from n items is too coarse to mean much: its 95% interval is wider than WIDE."""
    lo, hi = rate_interval(rate, n)
    return hi - lo > WIDE
