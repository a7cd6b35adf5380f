"""`RankingPool`: n-gram scoring in spawned worker processes equals scoring in this process, whether the index
was built in memory (saved once for the workers) or loaded memory-mapped from its directory (mapped in place)."""

import os

import numpy as np

from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.retrieval.ngram_scoring import NgramScoringConfig
from genret_jax.retrieval.ranking_pool import RankingPool, score_query


def _queries(index, rng, n):
  """Per query: n-grams cut from the corpus (so they occur) and a few random ones, with log-probs and counts."""
  out = []
  for _ in range(n):
    keys, logprobs, counts = [], [], []
    for _ in range(int(rng.integers(3, 12))):
      d = int(rng.integers(index.num_docs))
      doc = index.doc_tokens(d)
      start = int(rng.integers(max(len(doc) - 2, 1)))
      key = tuple(int(t) for t in doc[start:start + int(rng.integers(1, 4))]) or (5,)
      keys.append(key)
      logprobs.append(float(-rng.random() * 5))
      counts.append(index.count(key) if rng.random() < 0.7 else -1)
    out.append((keys, logprobs, counts))
  return out


def test_pool_scores_equal_in_process_scores(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(2, 40, size=int(rng.integers(5, 30))).astype(np.int32) for _ in range(60)]
  built = SuffixArrayIndex.build(docs, 1)
  built.save(str(tmp_path / "sa"))
  cfg = NgramScoringConfig(hits=20)
  queries = _queries(built, rng, 12)
  want = [score_query(*q, index=built, cfg=cfg) for q in queries]
  for index in (built, SuffixArrayIndex.load(str(tmp_path / "sa"), mmap=True)):
    pool = RankingPool(index, cfg, workers=2)
    tmp = pool._tmp
    try:
      got = pool.score(queries)
      assert (tmp is None) == isinstance(index.sa, np.memmap)   # mapped in place when it can be
    finally:
      pool.close()
    assert tmp is None or not os.path.exists(tmp)   # the in-memory index's copy is removed
    assert len(got) == len(want)
    for (gd, gs, gstats), (wd, ws, wstats) in zip(got, want):
      np.testing.assert_array_equal(gd, wd)
      np.testing.assert_array_equal(gs, ws)
      assert gstats == wstats
