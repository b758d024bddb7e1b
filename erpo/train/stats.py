"""Confidence intervals over seeds for `erpo compare`: Student t intervals (scipy for the quantiles).

A seed is one independent run; with n seeds the interval of a mean has n - 1 degrees of freedom. Methods are
compared on the same seeds (same warm-up, same prompt order), so a difference is the paired one: the t
interval of the per-seed differences. Fewer than 2 seeds give no interval (NaN bounds), never a made-up one.
"""
import math
from dataclasses import dataclass


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (for a difference: the two methods differ at this confidence)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def mean_ci(values: list[float], level: float = 0.95) -> Interval:
    from scipy import stats

    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_diff_ci(values: dict, baseline: dict, level: float = 0.95) -> Interval:
    """Interval of mean(values[s] - baseline[s]) over the seeds s both have a finite value for."""
    seeds = [s for s in values if s in baseline and _finite(values[s]) and _finite(baseline[s])]
    return mean_ci([values[s] - baseline[s] for s in seeds], level)


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def sentence(name: str, baseline: str, metric: str, diff: Interval, level: float = 0.95) -> str:
    if diff.n < 2:
        return f"{name} vs {baseline}, {metric}: {diff.mean:+.3f} over {diff.n} seed(s): no interval (needs >= 2 seeds)"
    verdict = "significant" if diff.significant else "not significant"
    return (f"{name} vs {baseline}, {metric}: {diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}], {verdict} "
            f"over {diff.n} seeds ({round(level * 100)} % paired t interval)")
