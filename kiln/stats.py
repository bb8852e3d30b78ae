"""Paired comparisons with a confidence interval: is one stage's model better than another's on the same prompts?

Both models are evaluated on the same prompts with the same noise, so each prompt gives one paired difference; the
bootstrap resamples prompts (not images: images of one prompt are not independent) and reads the interval off the
resampled means (percentile bootstrap)."""

from __future__ import annotations

import numpy as np


def paired_bootstrap_ci(before, after, n_boot: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """(mean gain, low, high): the mean of after - before over paired units and its `level` percentile bootstrap
    interval. before, after: (n,) per-unit scores, unit i of one paired with unit i of the other."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1 or before.size == 0:
        raise ValueError(f"paired_bootstrap_ci: needs two equal-length 1-d score lists, got shapes {before.shape} "
                         f"and {after.shape}")
    gains = after - before  # (n,)
    draws = np.random.default_rng(seed).integers(0, gains.size, size=(n_boot, gains.size))  # (n_boot, n)
    means = gains[draws].mean(axis=1)  # (n_boot,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(gains.mean()), float(low), float(high)
