import numpy as np
import pytest

from lpo.stats import bootstrap, calibration_error


def test_interval_contains_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small = bootstrap(rng.random(50) < 0.6, seed=1)
    large = bootstrap(rng.random(5000) < 0.6, seed=1)
    for e in (small, large):
        assert e.low <= e.mean <= e.high
    assert large.high - large.low < (small.high - small.low) / 4
    assert large.low < 0.6 < large.high


def test_grouped_bootstrap_is_wider_for_correlated_groups():
    # Four identical images per prompt carry one prompt's worth of information, not four.
    rng = np.random.default_rng(0)
    per_prompt = rng.random(100) < 0.5
    values, groups = np.repeat(per_prompt, 4), np.repeat(np.arange(100), 4)
    grouped, iid = bootstrap(values, groups, seed=2), bootstrap(values, seed=2)
    assert (grouped.high - grouped.low) > 1.5 * (iid.high - iid.low)


def test_deterministic_for_a_seed():
    values = np.arange(20.0)
    assert bootstrap(values, seed=3) == bootstrap(values, seed=3)


def test_calibration_error_by_hand():
    # Bin [0.9, 1.0): predictions 0.9, 0.9 against outcomes 1, 0 -> |1.8 - 1| / 4; bin [0.2, 0.3): 0.2, 0.2 against
    # 0, 0 -> 0.4 / 4: ECE = (0.8 + 0.4) / 4 = 0.3.
    assert calibration_error([0.9, 0.9, 0.2, 0.2], [1, 0, 0, 0]) == pytest.approx(0.3)
    assert calibration_error([0.75, 0.25, 0.75, 0.25], [1, 0, 1, 0]) == pytest.approx(0.25)
    assert calibration_error([1.0, 0.0], [1, 0]) == 0.0  # p = 1 falls in the last bin
    with pytest.raises(ValueError, match="calibration error"):
        calibration_error([], [])
