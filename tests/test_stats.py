import numpy as np

from lpo.stats import bootstrap


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
