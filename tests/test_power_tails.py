"""Power and detectable effect at strict levels: scipy's noncentral t returns NaN in its
far lower tail (n = 15, alpha = 0.005, d = 2 raised ValueError from the root finder);
`t_test_power` then reads that tail from its definition as a chi integral."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from rloop_ray.analysis.power import POWER, detectable_effect, t_test_power

ALPHAS = (0.05, 0.005, 0.001, 0.0001)


@pytest.mark.parametrize("n_b", [None, "same"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_power_is_finite_and_monotone_in_d(alpha, n_b):
    for n in (3, 15, 60, 1000):
        other = n if n_b == "same" else None
        powers = [t_test_power(d / 10, n, other, alpha=alpha) for d in range(0, 501)]
        assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in powers)
        assert all(b >= a - 1e-12 for a, b in zip(powers, powers[1:]))
        assert powers[0] == pytest.approx(alpha, rel=1e-6)  # d = 0: the test's level


def test_far_tail_matches_the_noncentral_t_where_scipy_has_it():
    df, crit = 14, stats.t.ppf(1 - 0.0025, 14)
    root = math.sqrt(df)
    for ncp in (0.5, 2.0, 3.0):  # nct finite here; the chi integral must agree
        integral = stats.chi(df).expect(
            lambda x, ncp=ncp: stats.norm.cdf(-ncp - crit * x / root))
        assert integral == pytest.approx(stats.nct.cdf(-crit, df, ncp), rel=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_detectable_effect_at_strict_levels(alpha):
    for n_b in (None, "same"):
        ds = []
        for n in (2, 3, 5, 10, 15, 20, 40):
            other = n if n_b == "same" else None
            d = detectable_effect(n, other, alpha=alpha)
            assert math.isfinite(d) and d > 0, (n, alpha)
            assert t_test_power(d, n, other, alpha=alpha) == pytest.approx(POWER, abs=1e-4)
            ds.append(d)
        assert ds == sorted(ds, reverse=True)  # more prompts, smaller detectable effects
    assert detectable_effect(15, alpha=0.005) > detectable_effect(15, alpha=0.05)


def test_the_case_that_crashed():
    assert detectable_effect(15, alpha=0.005) == pytest.approx(1.099, abs=1e-3)
