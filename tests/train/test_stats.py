"""erpo compare's intervals against scipy's own t-test intervals, on fresh random data."""
import math
import random

import pytest
from scipy import stats as sp

from erpo.train import stats


@pytest.mark.parametrize("n", [2, 3, 5, 11])
def test_mean_interval_matches_scipy(n):
    rng = random.Random(n)
    values = [rng.gauss(0.3, 0.2) for _ in range(n)]
    got = stats.mean_ci(values, 0.95)
    want = sp.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert got.mean == pytest.approx(sum(values) / n, rel=1e-12)
    assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-9)
    got90 = stats.mean_ci(values, 0.9)
    want90 = sp.ttest_1samp(values, 0.0).confidence_interval(0.9)
    assert (got90.low, got90.high) == pytest.approx((want90.low, want90.high), rel=1e-9)


def test_paired_difference_matches_scipy_ttest_rel():
    rng = random.Random(7)
    base = {s: rng.random() for s in range(6)}
    other = {s: base[s] + 0.05 + rng.gauss(0, 0.03) for s in range(6)}
    other[9] = 1.0  # a seed the baseline lacks is left out of the pairing
    got = stats.paired_diff_ci(other, base)
    seeds = sorted(base)
    want = sp.ttest_rel([other[s] for s in seeds], [base[s] for s in seeds]).confidence_interval(0.95)
    assert got.n == 6 and (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-9)
    assert got.significant == (want.low > 0 or want.high < 0)


def test_one_seed_has_no_interval_and_is_never_significant():
    one = stats.mean_ci([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high) and not one.significant
    assert "no interval" in stats.sentence("ERPO", "GRPO", "final greedy pass@1", one)


def test_sentence_says_whether_the_interval_excludes_zero():
    assert "not significant over 5 seeds" in stats.sentence("ERPO", "GRPO", "x", stats.Interval(0.04, -0.02, 0.1, 5))
    text = stats.sentence("ERPO", "GRPO", "final greedy pass@1", stats.Interval(0.04, 0.01, 0.07, 5))
    assert text.startswith("ERPO vs GRPO, final greedy pass@1: +0.040 [+0.010, +0.070], significant over 5 seeds")
