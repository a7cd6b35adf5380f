"""n-gram document scoring on several CPU cores: worker processes that each memory-map the suffix array.

The scoring is host numpy with a Python loop over keys (~0.1-0.3 s a query on one core, docs/retrieval.md), so on an
accelerator host it, not the decoding, bounds a retrieval job: a batch of 32 queries decodes in well under a second
and scores in several. Queries are independent, so `RankingPool` scores them in `workers` processes. Threads would
share the GIL with that loop. The workers are spawned, not forked (a forked JAX process can deadlock), and read the
index memory-mapped from its saved directory, so the page cache holds one copy for all of them. The results are
those of `score_documents` in this process, exactly (same code, same inputs).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np

from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.retrieval.ngram_scoring import NgramScoringConfig, score_documents

_WORKER: dict = {}


def _init_worker(index_dir: str, cfg: NgramScoringConfig) -> None:
  _WORKER["index"] = SuffixArrayIndex.load(index_dir, mmap=True)
  _WORKER["cfg"] = cfg


def _score(item: tuple[list, list, list]) -> tuple[np.ndarray, np.ndarray, dict]:
  return score_query(*item, index=_WORKER["index"], cfg=_WORKER["cfg"])


def score_query(keys: Sequence, logprobs: Sequence[float], counts: Sequence[int], *, index,
                cfg: NgramScoringConfig) -> tuple[np.ndarray, np.ndarray, dict]:
  """(document indices, scores, stats) of one query from its decoded n-gram history; counts < 0 are unknown."""
  known = None if any(c < 0 for c in counts) else counts
  s = score_documents(keys, logprobs, index, cfg, counts=known)
  return s.doc_indices, s.scores, s.stats


def _saved_directory(index: SuffixArrayIndex) -> str | None:
  """The directory `index` was loaded from memory-mapped (`SuffixArrayIndex.load`), if any."""
  name = getattr(index.sa, "filename", None)
  if not name:
    return None
  directory = os.path.dirname(name)
  return directory if os.path.exists(os.path.join(directory, "meta.json")) else None


class RankingPool:
  """Scores the queries of a batch in `workers` spawned processes (see the module docstring)."""

  def __init__(self, index: SuffixArrayIndex, cfg: NgramScoringConfig, workers: int):
    self._tmp = None
    index_dir = _saved_directory(index)
    if index_dir is None:   # built in memory (no cache directory): saved once where the workers can map it
      self._tmp = tempfile.mkdtemp(prefix="genret-ranking-")
      index_dir = os.path.join(self._tmp, "suffix_array")
      index.save(index_dir)
    self.workers = workers
    self._executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(index_dir, cfg))

  def score(self, per_query: Sequence[tuple[list, list, list]]) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    # Chunks of about two per worker: few round trips, and the slowest query does not hold a long chunk back.
    chunk = max(1, len(per_query) // (2 * self.workers))
    return list(self._executor.map(_score, per_query, chunksize=chunk))

  def close(self) -> None:
    self._executor.shutdown(wait=True, cancel_futures=True)
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None
