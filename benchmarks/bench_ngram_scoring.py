"""Host-side n-gram document scoring speed (retrieval/ngram_scoring.py) on a synthetic Zipf corpus.

Usage: python benchmarks/bench_ngram_scoring.py [--docs 5000] [--doc_len 200] [--keys 270 2000] [--seed 0]
                                               [--workers 2 --queries 32]
Prints seconds per query and the key/candidate statistics for each key count. With --workers, also scores
--queries queries (at the first --keys count) in this process and in a `RankingPool` of that many spawned workers
(the index saved and memory-mapped, as `genret retrieve` does), interleaved --repeats times, and prints both rates
and their ratio; the two must return the same rankings.
"""

import argparse
import time

import numpy as np

from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.retrieval import ngram_scoring as ns


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--docs", type=int, default=5000)
  p.add_argument("--doc_len", type=int, default=200)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--keys", type=int, nargs="+", default=[270, 2000])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--queries", type=int, default=32)
  a = p.parse_args()
  rng = np.random.default_rng(a.seed)
  prob = 1.0 / np.arange(1, a.vocab)
  prob /= prob.sum()
  docs = [rng.choice(np.arange(1, a.vocab), size=a.doc_len, p=prob).astype(np.int32) for _ in range(a.docs)]
  t = time.perf_counter()
  index = SuffixArrayIndex.build(docs, 0)
  print(f"index: {index.num_tokens} tokens built in {time.perf_counter() - t:.2f} s")
  for n_keys in a.keys:
    keys = []
    for _ in range(n_keys):
      d = docs[rng.integers(len(docs))]
      n = int(rng.integers(1, 10))
      s = int(rng.integers(0, a.doc_len - n))
      keys.append(tuple(d[s:s + n].tolist()))
    logprobs = (-rng.exponential(3.0, size=n_keys)).tolist()
    counts = [index.count(k) for k in keys]
    times = []
    for _ in range(a.repeats):
      t = time.perf_counter()
      res = ns.score_documents(keys, logprobs, index, counts=counts)
      times.append(time.perf_counter() - t)
    print(f"{n_keys} keys: {min(times):.3f} s/query (best of {a.repeats}); {res.stats}")
  if a.workers:
    _compare_pool(a, docs, index, rng)


def _queries(docs, index, rng, n_queries, n_keys, doc_len):
  out = []
  for _ in range(n_queries):
    keys = []
    for _ in range(n_keys):
      d = docs[rng.integers(len(docs))]
      n = int(rng.integers(1, 10))
      s = int(rng.integers(0, doc_len - n))
      keys.append(tuple(d[s:s + n].tolist()))
    out.append((keys, (-rng.exponential(3.0, size=n_keys)).tolist(), [index.count(k) for k in keys]))
  return out


def _compare_pool(a, docs, index, rng):
  import os
  import tempfile

  from genret_jax.retrieval.ngram_scoring import NgramScoringConfig
  from genret_jax.retrieval.ranking_pool import RankingPool, score_query
  queries = _queries(docs, index, rng, a.queries, a.keys[0], a.doc_len)
  cfg = NgramScoringConfig()
  with tempfile.TemporaryDirectory() as tmp:
    index.save(os.path.join(tmp, "sa"))
    mapped = SuffixArrayIndex.load(os.path.join(tmp, "sa"), mmap=True)
    pool = RankingPool(mapped, cfg, a.workers)
    try:
      pool.score(queries[:a.workers])   # workers started and the index mapped before timing
      one, many = [], []
      for _ in range(a.repeats):
        t = time.perf_counter()
        want = [score_query(*q, index=mapped, cfg=cfg) for q in queries]
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = pool.score(queries)
        many.append(time.perf_counter() - t)
        assert all(np.array_equal(g[0], w[0]) and np.array_equal(g[1], w[1]) for g, w in zip(got, want))
    finally:
      pool.close()
  q1, qn = a.queries / np.median(one), a.queries / np.median(many)
  print(f"{a.queries} queries x {a.keys[0]} keys, {os.cpu_count()} CPUs: in-process {q1:.1f} queries/s, "
        f"{a.workers} workers {qn:.1f} queries/s, ratio {qn / q1:.2f}x (medians of {a.repeats}; same rankings)")


if __name__ == "__main__":
  main()
