"""The shaded intervals of `erpo compare`'s curves stay inside each quantity's range (issue 25): a t interval over
a few seeds near 0 reaches below 0, which no entropy, length, fraction or 0/1 reward can."""
import math
from types import SimpleNamespace

import pytest

from erpo.train import compare, stats


def test_band_clips_the_interval_and_keeps_the_mean():
    values = [0.0, 0.0, 0.3]  # mean 0.1; its t interval reaches about -0.33
    raw = stats.mean_ci(values)
    assert raw.low < 0  # the interval the clipping must fix
    clipped = compare.band(values, 0.0, None)
    assert clipped.low == 0.0 and clipped.high == pytest.approx(raw.high) and clipped.mean == pytest.approx(0.1)
    assert clipped.n == 3

    near_one = [1.0, 1.0, 0.7]
    assert stats.mean_ci(near_one).high > 1
    top = compare.band(near_one, 0.0, 1.0)
    assert top.high == 1.0 and top.low == pytest.approx(stats.mean_ci(near_one).low)


def test_band_without_bounds_and_with_one_seed():
    values = [0.0, 0.0, 0.3]
    unbounded = compare.band(values)
    assert unbounded.low < 0 and unbounded.low == pytest.approx(stats.mean_ci(values).low)
    one = compare.band([0.4], 0.0, 1.0)  # one seed: no interval, never a made-up one
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high)


def test_ranges_of_the_panels():
    assert compare.band_range("entropy", [0.1]) == (0.0, None)
    assert compare.band_range("response_len", [2.0]) == (0.0, None)
    for fraction in ("clip_frac", "masked_frac", "eval_pass@1"):
        assert compare.band_range(fraction, [0.5]) == (0.0, 1.0)
    assert compare.band_range("reward", [0.0, 1.0]) == (0.0, None)
    assert compare.band_range("reward", [-1.0, 1.0]) == (None, None)  # a user reward below 0: no bound assumed
    assert {key for key, _ in compare.PANELS} <= set(compare.RANGES) | {"reward"}


def _records(values_by_step, key):
    return [{"step": step, key: value, "reward": 0.5} for step, value in enumerate(values_by_step, 1)]


@pytest.mark.parametrize("key,low,high", [("entropy", 0.0, math.inf), ("clip_frac_low", 0.0, 1.0),
                                          ("masked_frac", 0.0, 1.0), ("reward", 0.0, math.inf)])
def test_curve_bands_are_clipped(key, low, high):
    """What `curves` draws: three seeds, two near the bound, one away from it, at every step."""
    method = SimpleNamespace(label="grpo")
    near = high if high < math.inf else low
    away = near - 0.3 if high < math.inf else near + 0.3
    records, runs = {}, []
    for seed, value in enumerate([near, near, away]):
        run = SimpleNamespace(method=method, seed=seed, dir=f"run{seed}")
        runs.append(run)
        records[run.dir] = _records([value] * 4, key)
        if key == "clip_frac_low":
            for record in records[run.dir]:
                record["clip_frac_high"] = 0.0
        if key == "reward":
            for record in records[run.dir]:
                record["reward"] = value
    panel = "clip_frac" if key == "clip_frac_low" else key
    steps, bands = compare.curve_bands(runs, records, panel, smooth_window=2)["grpo"]
    assert steps == [1, 2, 3, 4]
    for b in bands:
        assert b.n == 3 and low <= b.low <= b.mean <= b.high <= high
        assert b.low == low or b.high == high  # the bound binds: without clipping it would be crossed
