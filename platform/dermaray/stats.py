"""Bootstrap confidence intervals: every figure a study reports comes with one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(value, low, high): `statistic(indices)` on all items and the percentile interval over resamples
    of the items with replacement. `statistic` takes an index array, so it can pair columns."""
    if n_items == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    value = float(statistic(np.arange(n_items)))
    draws = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(resamples)], dtype=float)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(draws, [tail, 100 - tail])
    return value, float(low), float(high)


def mean_ci(values: Sequence[float] | np.ndarray, **kwargs) -> tuple[float, float, float]:
    """bootstrap_ci of the mean of `values` (e.g. 0/1 per note: a rate)."""
    values = np.asarray(values, dtype=float)
    return bootstrap_ci(lambda i: values[i].mean(), len(values), **kwargs)


def format_ci(ci: tuple[float, float, float], percent: bool = False, digits: int = 3) -> str:
    """ "0.123 [0.100, 0.150]" or "12.3% [10.0, 15.0]"."""
    value, low, high = ci
    if percent:
        return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
