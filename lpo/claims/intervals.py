"""The 95% intervals of the claims' statistics, each from the finest data the earlier stages store.

- Paired bootstrap over prompts: every method's images share prompts and seeds, so each resample of prompts
  moves all methods' images of a prompt together and the interval is the difference's own, not two intervals
  combined (the images of one prompt are not independent: resampling images alone would understate it).
- Correlations without their pairs (the reward study stores a model's correlation and its number of pairs, not the
  per-pair gaps): each correlation is drawn on the Fisher-z scale, independently of the others. Two LRMs scored
  on the same pairs are positively dependent, so the interval of their difference is wider than a paired one.
- Accuracies without their pairs (the reward study stores each cell's bootstrap interval): normal intervals from
  the cells' standard errors, adding those of one split's timesteps (the same pairs: the largest their unknown
  correlation allows) and combining splits and models as independent.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lpo.stats import Estimate

LEVEL = 0.95
Z = 1.959963984540054   # the two-sided 95% normal quantile

# {name: array of draws (or a 0-d array of the full-sample value)} -> the statistic's values
Statistic = Callable[[dict[str, np.ndarray]], np.ndarray]


def _percentiles(estimate: float, draws: np.ndarray) -> Estimate:
    alpha = (1 - LEVEL) / 2
    return Estimate(float(estimate), float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)))


def paired_prompt_bootstrap(values: dict[str, np.ndarray], prompts: np.ndarray, statistic: Statistic, n: int,
                            seed: int) -> Estimate:
    """`values[name][i]`: image i's score under method `name` (the same prompt and seed for every name);
    `prompts[i]`: its prompt. The statistic of the methods' means, its interval from resampled prompts."""
    _, inverse = np.unique(prompts, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    sums = {name: np.bincount(inverse, weights=np.asarray(v, dtype=np.float64)) for name, v in values.items()}
    draws = np.random.default_rng(seed).integers(0, counts.size, size=(n, counts.size))
    drawn = counts[draws].sum(1)
    means = {name: s[draws].sum(1) / drawn for name, s in sums.items()}
    full = {name: np.asarray(s.sum() / counts.sum()) for name, s in sums.items()}
    return _percentiles(statistic(full), statistic(means))


def fisher_z_draws(correlations: dict[str, tuple[float, int]], statistic: Statistic, n: int, seed: int
                   ) -> Estimate:
    """`correlations[name]`: (Pearson r, pairs it was computed on). The statistic of the correlations, its
    interval from independent draws of atanh(r) ~ N(atanh(r), 1 / (pairs - 3))."""
    small = [name for name, (_, pairs) in correlations.items() if pairs < 4]
    if small:
        raise ValueError(f"correlations of {', '.join(small)} rest on fewer than 4 pairs: no Fisher-z interval")
    rng = np.random.default_rng(seed)
    draws = {name: np.tanh(rng.normal(np.arctanh(np.clip(r, -0.999999, 0.999999)), 1 / np.sqrt(pairs - 3), n))
             for name, (r, pairs) in correlations.items()}
    return _percentiles(statistic({name: np.asarray(r) for name, (r, _) in correlations.items()}),
                        statistic(draws))


def pooled_difference(a: list[dict], b: list[dict]) -> Estimate:
    """Mean of model a's cells minus model b's, each weighted by its pairs, with a normal 95% interval. A cell is
    {split, estimate, low, high, pairs}: one split at one timestep, with its 95% interval."""
    mean_a, var_a = _pooled(a)
    mean_b, var_b = _pooled(b)
    half = Z * float(np.sqrt(var_a + var_b))
    return Estimate(mean_a - mean_b, mean_a - mean_b - half, mean_a - mean_b + half)


def _pooled(cells: list[dict]) -> tuple[float, float]:
    total = sum(c["pairs"] for c in cells)
    mean = sum(c["estimate"] * c["pairs"] for c in cells) / total
    per_split: dict[str, float] = {}
    for c in cells:
        se = (c["high"] - c["low"]) / (2 * Z)
        per_split[c["split"]] = per_split.get(c["split"], 0.0) + se * c["pairs"] / total
    return mean, sum(se ** 2 for se in per_split.values())
