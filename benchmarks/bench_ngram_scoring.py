"""Host-side n-gram document scoring speed (retrieval/ngram_scoring.py) on a synthetic Zipf corpus.

Usage: python benchmarks/bench_ngram_scoring.py [--docs 5000] [--doc_len 200] [--keys 270 2000] [--seed 0]
Prints seconds per query and the key/candidate statistics for each key count.
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


if __name__ == "__main__":
  main()
