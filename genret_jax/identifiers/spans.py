"""Query-biased body-span sampling for n-gram identifiers (MINDER/SEAL `extract_spans`, seeded).

Behaviour follows the reference (SLGR_BEHAVIOUR.md §1.4): 3-word windows of the query are fuzzy-matched
against 3-word windows starting at every non-stop-word passage position, scores are summed per position,
positions are drawn with replacement from softmax(score / T), and each span is the passage words from the
drawn position. The one deliberate change (§9 item 9): the randomness comes from a numpy Generator that
the caller seeds per (seed, query, document), never from the global `random` module.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import hashlib
import itertools
import logging
import multiprocessing
import os
import sys
import time
import types
from typing import Sequence

import numpy as np

from genret_jax.errors import InputError
from genret_jax.identifiers.stopwords import ENGLISH_STOP_WORDS

try:  # the same algorithm compiled with Cython: identical ratios, ~4x faster (span sampling dominates CGL set-up)
  import cydifflib as _difflib
except ImportError:  # pragma: no cover - the pinned install has it
  _difflib = difflib

WINDOW = 3
logger = logging.getLogger(__name__)


def fuzz_ratio(s1: str, s2: str) -> int:
  """fuzzywuzzy 0.18 `fuzz.ratio` without python-Levenshtein: round(100 * SequenceMatcher.ratio())."""
  if s1 == s2:
    return 100
  if not s1 or not s2:
    return 0
  return int(round(100 * _difflib.SequenceMatcher(None, s1, s2).ratio()))


def match_scores(query: str, passage_words: Sequence[str]) -> dict[int, float]:
  """Summed fuzzy scores per non-stop-word passage position (the reference's `matches`)."""
  source = query.split("||", 1)[0]
  q = [w.lower() for w in source.split()]
  p = [w.lower() for w in passage_words]
  matches: dict[int, float] = {}
  if not q:
    return matches
  q_windows = [" ".join(q[i:i + WINDOW]) for i in range(len(q))]
  matcher = _difflib.SequenceMatcher(None)
  for i2, word in enumerate(p):
    if word in ENGLISH_STOP_WORDS:
      continue
    str_2 = " ".join(p[i2:i2 + WINDOW])
    # SequenceMatcher caches its analysis of seq2, so the passage window is fixed while queries vary.
    matcher.set_seq2(str_2)
    total = 0.0
    for str_1 in q_windows:
      if str_1 == str_2:
        total += 1.0
        continue
      matcher.set_seq1(str_1)
      total += int(round(100 * matcher.ratio())) / 100
    matches[i2] = total
  return matches


def extract_spans(passage_words: Sequence[str], query: str, rng: np.random.Generator, *,
                  n_samples: int = 10, min_length: int = 10, max_length: int = 10,
                  temperature: float = 1.0) -> list[str]:
  """Samples query-biased spans of `passage_words` (original case), as the reference does, but seeded.

  Returns n_samples spans, or exactly one span when no passage position is scorable (reference quirk:
  an all-stop-word passage or an empty query yields the span at position 0 once).
  """
  if not passage_words:
    return []
  matches = match_scores(query, passage_words)
  if not matches:
    indices = [0]
  else:
    positions = np.fromiter(matches.keys(), dtype=np.int64)
    scores = np.fromiter(matches.values(), dtype=np.float64)
    if scores.sum() == 0:
      indices = [0] * n_samples
    else:
      logits = scores / temperature
      weights = np.exp(logits - logits.max())
      weights /= weights.sum()
      indices = rng.choice(positions, size=n_samples, replace=True, p=weights).tolist()
  spans = []
  for i in indices:
    length = int(rng.integers(min_length, max_length + 1))
    spans.append(" ".join(passage_words[i:i + length]))
  return spans


def extract_spans_many(jobs: Sequence[tuple[str, Sequence[str] | str, int]], seed: int, *,
                       workers: int | None = None, chunk: int = 64, **kw) -> list[list[str]]:
  """`extract_spans(words, query, span_rng(seed, query, doc), **kw)` of every (query, passage, document index)
  job, in order; the passage is its words, or its text (split on whitespace where the job runs: a reference to a
  document's text costs nothing to hold, a list of its words per pair does at CGL scale). With `workers` > 1 the
  jobs are spread over that many processes (None: `default_workers`). A job's spans depend only on the job and
  `seed`, so the result does not depend on `workers` or `chunk` (tested)."""
  jobs = list(jobs)
  workers = default_workers(len(jobs)) if workers is None else workers
  if workers <= 1 or len(jobs) <= chunk:
    return _spans_chunk(jobs, seed, kw)
  chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  # disable=None: a bar on a terminal only (NQ-scale CGL set-up samples for minutes), nothing in logs.
  bar = tqdm(total=len(jobs), desc="sampling spans", unit="pair", disable=None, leave=False)
  # spawn, not fork: the calling process usually runs JAX's threads, and a forked copy of a multithreaded
  # process can deadlock; a spawned worker imports only genret_jax.identifiers (numpy, cydifflib; no JAX or TF).
  ctx = multiprocessing.get_context("spawn")
  out: list[list[str]] = []
  t0 = time.perf_counter()
  try:
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
      with _main_module_hidden():   # map submits every chunk at once, so every worker starts in here
        parts = pool.map(_spans_chunk, chunks, itertools.repeat(seed), itertools.repeat(kw))
      for part in parts:
        out += part
        bar.update(len(part))
  except concurrent.futures.process.BrokenProcessPool as e:   # e.g. a worker killed for memory
    logger.warning("span sampling processes failed (%s); sampling in this process instead", e)
    return _spans_chunk(jobs, seed, kw)
  finally:
    bar.close()
  logger.info("spans of %d (query, document) pairs in %.1f s over %d processes", len(jobs),
              time.perf_counter() - t0, min(workers, len(chunks)))
  return out


@contextlib.contextmanager
def _main_module_hidden():
  """A spawned process re-runs the parent's main script (or module) before its task, so that functions defined
  there can be unpickled. Ours need nothing from it, and re-running it would cost every worker the script's
  imports (TensorFlow, JAX: seconds and hundreds of MB each, for a t5x-style trainer's main) and break scripts
  without an `if __name__ == "__main__":` guard. With an empty main module, the workers skip that step."""
  main = sys.modules.get("__main__")
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    sys.modules["__main__"] = main


def _spans_chunk(jobs, seed: int, kw: dict) -> list[list[str]]:
  return [extract_spans(passage.split() if isinstance(passage, str) else passage, query,
                        span_rng(seed, query, doc), **kw) for query, passage, doc in jobs]


def default_workers(num_jobs: int, jobs_per_worker: int = 128) -> int:
  """Processes for `num_jobs` span samplings: this host's usable cores, or `GENRET_SPAN_WORKERS`; one for small
  batches, where starting a process (~0.2 s here) costs more than the sampling (~5-20 ms a job)."""
  env = os.environ.get("GENRET_SPAN_WORKERS", "").strip()
  if env:
    try:
      return max(1, int(env))
    except ValueError:
      raise InputError(f"must be an integer, got {env!r}", key="GENRET_SPAN_WORKERS") from None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(cores, num_jobs // jobs_per_worker))


def span_rng(seed: int, query_text: str, doc_idx: int) -> np.random.Generator:
  """A Generator that depends only on (seed, query text, document index): order- and thread-independent."""
  digest = hashlib.sha256(query_text.encode("utf-8")).digest()
  words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(doc_idx), *words])
