"""Seeded bootstrap over queries: resampling indices, percentile intervals, per-cell means.

Every scaling quantity here is a mean over queries, so the unit of resampling is the query. When several
cells (models) were evaluated on the same queries, one resample uses the same query indices in every cell,
which keeps the between-cell differences paired (the negatives are shared too, see `cgl.sample_negatives`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from genret_jax.errors import InputError

DEFAULT_CONFIDENCE = 0.95


def resample_indices(num_items: int, num_resamples: int, seed: int) -> np.ndarray:
  """[num_resamples, num_items] int64 indices drawn with replacement; a pure function of the arguments."""
  if num_items <= 0:
    raise InputError("cannot bootstrap over zero queries", key="num_items")
  rng = np.random.default_rng([int(seed), 0xB007])
  return rng.integers(0, num_items, size=(int(num_resamples), int(num_items)), dtype=np.int64)


def percentile_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE,
                        axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Percentile interval of bootstrap samples along `axis`, ignoring NaN (failed resamples)."""
  if not 0.0 < confidence < 1.0:
    raise InputError(f"confidence must lie in (0, 1), got {confidence}", key="confidence")
  tail = 100.0 * (1.0 - confidence) / 2.0
  samples = np.asarray(samples, dtype=np.float64)
  with np.errstate(invalid="ignore"):  # inf samples (unbounded parameters) are legitimate.
    lo = np.nanpercentile(samples, tail, axis=axis)
    hi = np.nanpercentile(samples, 100.0 - tail, axis=axis)
  return lo, hi


def mean_ci(values: Sequence[float] | np.ndarray, num_resamples: int = 1000, seed: int = 0,
            confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float, float]:
  """(mean, lower, upper): the mean of per-query values and its percentile bootstrap interval."""
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 1 or values.size == 0:
    raise InputError("mean_ci needs a non-empty 1-D array of per-query values", key="values")
  idx = resample_indices(values.size, num_resamples, seed)
  means = values[idx].mean(axis=1)
  lo, hi = percentile_interval(means, confidence)
  return float(values.mean()), float(lo), float(hi)


def resampled_cell_means(cells: Sequence[np.ndarray], num_resamples: int, seed: int) -> np.ndarray:
  """[num_resamples, num_cells] means of each cell's per-query values under shared query resamples.

  Cells with the same number of queries are treated as evaluated on the same (aligned) queries and share
  one index draw per resample. Cells of length L draw with a seed made of `seed` and L (a cell that skipped
  queries gets its own draws), so a cell's draws do not depend on which other cells are listed or in what order
  (before session 16 the seed followed the order lengths first appeared in).
  """
  arrays = [np.asarray(c, dtype=np.float64) for c in cells]
  for i, a in enumerate(arrays):
    if a.ndim != 1 or a.size == 0:
      raise InputError(f"cell {i}: per-query values must be a non-empty 1-D array", key="per_query")
  out = np.empty((int(num_resamples), len(arrays)), dtype=np.float64)
  draws: dict[int, np.ndarray] = {}
  for i, a in enumerate(arrays):
    if a.size not in draws:
      draws[a.size] = resample_indices(a.size, num_resamples, seed + 7919 * a.size)
    out[:, i] = a[draws[a.size]].mean(axis=1)
  return out
