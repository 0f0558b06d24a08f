"""The smallest effect a comparison could have detected: what "no effect" means at this n.

"Not significant" with 3 prompt pairs and with 300 are different statements; a report that
says only the first invites reading absence of evidence as evidence of absence. For every
comparison that finds nothing, the summary states the standardised effect the same test
would have found with 80% probability. It is exact for the t tests the comparisons run:
the power of a two-sided t test at noncentrality d * sqrt(n) (paired: n pairs, n - 1
degrees of freedom; independent: d * sqrt(n_a n_b / (n_a + n_b)), n_a + n_b - 2) is read
from the noncentral t distribution (`scipy.stats.nct`) and solved for d. The level is the
uncorrected two-sided alpha: after the sweep-wide FDR correction the detectable effect is
larger still, so the number is a lower bound, which is the honest direction to err in.
"""

from __future__ import annotations

import math

from scipy import optimize, stats

POWER = 0.8
"""The conventional power at which a design is said to be able to detect an effect."""


def t_test_power(d: float, n_a: int, n_b: int | None = None, *, alpha: float = 0.05) -> float:
    """Power of a two-sided t test for a true standardised effect `d`.

    `n_b=None` is the paired test over `n_a` pairs (d is d_z); otherwise Student's t over two
    groups with pooled sd (Welch's df differ little at equal variances).
    """
    if n_b is None:
        df, scale = n_a - 1, math.sqrt(n_a)
    else:
        df, scale = n_a + n_b - 2, math.sqrt(n_a * n_b / (n_a + n_b))
    if df < 1:
        return math.nan
    crit = stats.t.ppf(1.0 - alpha / 2.0, df)
    ncp = abs(d) * scale
    upper = float(stats.nct.sf(crit, df, ncp))
    lower = float(stats.nct.cdf(-crit, df, ncp))
    if math.isnan(lower):
        # scipy's nct returns NaN deep in the far tail (e.g. n = 15, alpha = 0.005, d = 2).
        # The tail is then read from its definition: T = (Z + ncp) / (X / sqrt(df)) with
        # X ~ chi(df), so P(T < -crit) = E_X[Phi(-ncp - crit X / sqrt(df))], a smooth
        # one-dimensional integral that does not lose precision there.
        root_df = math.sqrt(df)
        lower = float(stats.chi(df).expect(
            lambda x: stats.norm.cdf(-ncp - crit * x / root_df)))
    if math.isnan(upper):
        raise ValueError(f"power of d={d} at n={n_a}/{n_b}, alpha={alpha}: scipy's "
                         "noncentral t gave NaN")
    return min(1.0, upper + lower)


def detectable_effect(n_a: int, n_b: int | None = None, *, alpha: float = 0.05,
                      power: float = POWER) -> float:
    """The smallest |d| that a two-sided t test of this design detects with `power`.

    NaN when the design has no degrees of freedom (fewer than 2 pairs or 2 cells a side).
    """
    if math.isnan(t_test_power(1.0, n_a, n_b, alpha=alpha)):
        return math.nan  # no degrees of freedom

    def gap(d: float) -> float:
        return t_test_power(d, n_a, n_b, alpha=alpha) - power

    high = 1.0
    while gap(high) < 0:
        high *= 2.0
        if high > 1e6:
            return math.inf
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-6))
