"""Means with 95% bootstrap confidence intervals, resampling whole prompts (images of one prompt are not
independent, so resampling images alone would understate the interval)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(values: np.ndarray, groups: np.ndarray | None = None, n: int = 1000, seed: int = 0,
              level: float = 0.95) -> Estimate:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap of an empty sample")
    groups = np.arange(values.size) if groups is None else np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n, sums.size))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1 - level) / 2
    return Estimate(float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: over `bins` equal-width bins of the predicted probabilities, the mean of
    |mean prediction - observed frequency| weighted by each bin's share of the predictions. outcome: 1 where the
    predicted event happened, 0 where it did not."""
    probability, outcome = np.asarray(probability, np.float64), np.asarray(outcome, np.float64)
    if probability.size == 0 or probability.shape != outcome.shape:
        raise ValueError(f"calibration error of {probability.size} predictions and {outcome.size} outcomes")
    which = np.minimum((probability * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, probability, bins) - np.bincount(which, outcome, bins))
    return float(gap.sum() / count.sum())
