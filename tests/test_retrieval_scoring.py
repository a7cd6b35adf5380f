"""n-gram document scoring (retrieval/ngram_scoring.py) and docid mapping (retrieval/docids.py)."""

import math

import gin
import numpy as np
import pytest

from genret_jax.errors import InputError
from genret_jax.retrieval import docids
from genret_jax.retrieval import ngram_scoring as ns


class BruteForceIndex:
  """The `NgramIndex` protocol by brute force: documents concatenated with a separator, scanned linearly."""

  def __init__(self, docs, sep_id=-1):
    self.docs = [np.asarray(d, np.int64) for d in docs]
    self.starts = []
    flat = []
    for d in self.docs:
      self.starts.append(len(flat))
      flat.extend(d.tolist() + [sep_id])
    self.flat = np.asarray(flat, np.int64)
    self.starts = np.asarray(self.starts, np.int64)
    self.num_tokens = len(self.flat)

  def _positions(self, ngram):
    n = len(ngram)
    return [i for i in range(len(self.flat) - n + 1) if self.flat[i:i + n].tolist() == list(ngram)]

  def count(self, ngram):
    return len(self._positions(ngram))

  def occurrences(self, ngram, limit):
    return np.asarray(self._positions(ngram)[::-1][:limit], np.int64)  # any order: the scorer sorts

  def doc_of(self, positions):
    return np.searchsorted(self.starts, np.asarray(positions), side="right") - 1

  def doc_tokens(self, doc_idx):
    return self.docs[doc_idx]


def _index_factories():
  out = [pytest.param(BruteForceIndex, id="brute")]
  try:
    from genret_jax.decoding.suffix_array import SuffixArrayIndex  # pylint: disable=g-import-not-at-top
  except ImportError:
    return out
  def real(docs):
    return SuffixArrayIndex.build([np.asarray(d, np.int32) for d in docs], 0)
  out.append(pytest.param(real, id="suffix_array"))
  return out


INDEXES = _index_factories()

# Token ids start at 1 so that 0 can be the real suffix array's separator.
DOCS = [
    [1, 2, 3, 4, 5],        # d0: A covers B's only occurrence
    [3, 4, 9, 9, 9],        # d1: C three times, counted once
    [7, 8, 1, 2, 6],        # d2: nothing
    [2, 3, 9, 1, 2],        # d3: B and C
    [1, 2, 3, 10, 2, 3, 8],  # d4: A, then B fully repeated; D overlaps B
    [5, 6, 10, 6, 7],       # d5: F, then G half repeated
]
A, B, C, D, F, G = (1, 2, 3), (2, 3), (9,), (3, 8), (5, 6), (6, 7)


def _weights(index, keys, logprobs, cfg):
  counts = np.array([index.count(k) for k in keys])
  return ns.key_weights(np.array(logprobs), counts, np.array([len(k) for k in keys]), index.num_tokens, cfg)


def test_key_weight_hand_computed():
  cfg = ns.NgramScoringConfig()
  # N = 95 tokens, count 5, smoothing 5: p_corpus = 10/100, logit = log(1/9); p_model = 0.5, logit = 0.
  w = ns.key_weights(np.array([math.log(0.5), math.log(0.05), math.log(0.5), -np.inf]),
                     np.array([5, 5, 0, 5]), np.array([2, 2, 2, 2]), 95, cfg)
  assert w[0] == pytest.approx(math.log(9.0) ** 2, rel=1e-8)
  assert w[1] == 0.0          # the model likes it less than the corpus does
  assert w[2] == 0.0          # not in the corpus
  assert w[3] == 0.0          # -inf log-probability
  w1 = ns.key_weights(np.array([math.log(0.5)]), np.array([5]), np.array([1]), 95,
                      ns.NgramScoringConfig(alpha=1.0))
  assert w1[0] == pytest.approx(math.log(9.0), rel=1e-8)
  # Scoring length penalty: s -> s * (1 - lp)^(|g| - 1); p_model = 0.25 at lp 0.5, |g| = 2 -> 0.5.
  w2 = ns.key_weights(np.array([math.log(0.25)]), np.array([5]), np.array([2]), 95,
                      ns.NgramScoringConfig(length_penalty=1 - math.log(0.5) / math.log(0.25)))
  assert w2[0] == pytest.approx(math.log(9.0) ** 2, rel=1e-6)


def test_key_weight_rejects_bad_logprobs():
  cfg = ns.NgramScoringConfig()
  with pytest.raises(InputError):
    ns.key_weights(np.array([0.5]), np.array([1]), np.array([1]), 10, cfg)
  with pytest.raises(InputError):
    ns.key_weights(np.array([np.nan]), np.array([1]), np.array([1]), 10, cfg)


@pytest.mark.parametrize("make_index", INDEXES)
def test_document_scores_hand_computed(make_index):
  index = make_index(DOCS)
  beta = 0.8
  cfg = ns.NgramScoringConfig(beta=beta)
  keys = [A, B, C, D, F, G]
  lps = [-0.1, -0.3, -0.5, -1.0, -0.2, -0.6]
  w = dict(zip(keys, _weights(index, keys, lps, cfg)))
  assert w[A] > w[F] > w[B] > w[G] > w[C] > w[D] > 0
  res = ns.score_documents(keys, lps, index, cfg, explain=True)
  expected = {
      0: w[A],                                   # B's occurrence lies inside A's: rejected
      1: w[C],                                   # three occurrences, counted once
      3: w[B] + w[C],                            # C's tokens are new: no discount
      4: w[A] + (1 - beta) * w[B],               # second B is free but all its tokens are covered; D overlaps
      5: w[F] + w[G] * (1 - beta + beta * 0.5),  # G: token 7 new, 6 covered
  }
  got = dict(zip(res.doc_indices.tolist(), res.scores.tolist()))
  assert got.keys() == expected.keys()
  for d, s in expected.items():
    assert got[d] == pytest.approx(s, rel=1e-9), d
  assert res.doc_indices.tolist() == sorted(expected, key=lambda d: (-expected[d], d))
  explained = dict(zip(res.doc_indices.tolist(), res.contributions))
  assert [k for k, _ in explained[4]] == [A, B]
  assert res.stats["keys_rare"] == 6 and res.stats["candidates"] == 5


@pytest.mark.parametrize("make_index", INDEXES)
def test_frequent_keys_only_in_full_scoring(make_index):
  index = make_index(DOCS)
  e = (4, 9)  # once, in d1, overlapping C's first occurrence there
  keys, lps = [e, C], [-0.3, -0.5]
  # C occurs 4 times: with max_hits 3 it is "frequent": it cannot make d3 a candidate, but still scores in d1,
  # at its first free occurrence, fully discounted (token 9 is already covered by e).
  beta = 0.8
  cfg = ns.NgramScoringConfig(max_hits=3, beta=beta)
  w = dict(zip(keys, _weights(index, keys, lps, cfg)))
  assert w[e] > w[C] > 0
  res = ns.score_documents(keys, lps, index, cfg)
  assert res.doc_indices.tolist() == [1]
  assert res.scores[0] == pytest.approx(w[e] + (1 - beta) * w[C])
  assert res.stats["keys_frequent"] == 1 and res.stats["keys_rare"] == 1
  # Too frequent keys are dropped entirely.
  res2 = ns.score_documents(keys, lps, index, ns.NgramScoringConfig(max_hits=3, max_count=3))
  assert res2.scores.tolist() == pytest.approx([w[e]])
  assert res2.stats["keys_too_frequent"] == 1
  # No rare key at all: nothing is returned (as the reference).
  assert len(ns.score_documents([C], [-0.5], index, cfg).doc_indices) == 0


@pytest.mark.parametrize("make_index", INDEXES)
def test_duplicate_keys_max_or_last(make_index):
  index = make_index(DOCS)
  cfg_max, cfg_last = ns.NgramScoringConfig(), ns.NgramScoringConfig(duplicate_keys="last")
  w_hi, w_lo = _weights(index, [F, F], [-0.1, -1.0], cfg_max)
  res = ns.score_documents([F, F], [-0.1, -1.0], index, cfg_max)
  assert res.scores[0] == pytest.approx(w_hi) and res.stats["keys_duplicate"] == 1
  res = ns.score_documents([F, F], [-0.1, -1.0], index, cfg_last)
  assert res.scores[0] == pytest.approx(w_lo)


@pytest.mark.parametrize("make_index", INDEXES)
def test_first_stage_picks_fully_scored_candidates(make_index):
  index = make_index(DOCS)
  keys, lps = [A, B, C, F, G], [-0.1, -0.3, -0.5, -0.2, -0.6]
  full = ns.score_documents(keys, lps, index, ns.NgramScoringConfig())
  top2 = ns.score_documents(keys, lps, index, ns.NgramScoringConfig(fully_score=2))
  assert top2.stats["fully_scored"] == 2 and top2.stats["candidates"] == 5
  # First stage here equals the full score (rare keys only, no frequent ones), so the top 2 survive.
  assert top2.doc_indices.tolist() == full.doc_indices[:2].tolist()
  assert ns.score_documents(keys, lps, index, ns.NgramScoringConfig(hits=3)).doc_indices.tolist() == \
      full.doc_indices[:3].tolist()


def test_strip_and_empty_keys():
  index = BruteForceIndex(DOCS)
  cfg = ns.NgramScoringConfig(strip_token_ids=(0, 11))
  a = ns.score_documents([A], [-0.1], index, ns.NgramScoringConfig())
  b = ns.score_documents([(0, 1, 2, 3, 11), (11,), ()], [-0.1, -0.2, -0.3], index, cfg, counts=[0, 0, 0])
  assert b.doc_indices.tolist() == a.doc_indices.tolist()
  np.testing.assert_allclose(b.scores, a.scores)
  assert b.stats["keys_empty"] == 2
  with pytest.raises(InputError):
    ns.score_documents([A, B], [-0.1], index)


def test_accept_occurrences_self_overlap():
  # "a a" in "a a a a": occurrences at 0, 1, 2 -> 0 and 2 accepted; a later key at 1 is blocked.
  acc = ns.accept_occurrences([np.array([0, 1, 2]), np.array([1, 5])], [2, 1])
  assert acc[0].tolist() == [True, False, True] and acc[1].tolist() == [False, True]
  assert all(a.all() for a in ns.accept_occurrences([np.array([0, 1, 2]), np.array([1])], [2, 1], True))


def test_config_validation_and_gin():
  with pytest.raises(InputError, match="NgramScoringConfig.beta"):
    ns.NgramScoringConfig(beta=1.0)
  with pytest.raises(InputError, match="duplicate_keys"):
    ns.NgramScoringConfig(duplicate_keys="first")
  gin.clear_config()
  try:
    gin.parse_config(["NgramScoringConfig.alpha = 3.0", "NgramScoringConfig.hits = 7"])
    cfg = ns.NgramScoringConfig()
    assert cfg.alpha == 3.0 and cfg.hits == 7 and cfg.beta == 0.8
  finally:
    gin.clear_config()


def _sequential_reference(docs, keys, logprobs, cfg):
  """The scoring rules written plainly (position sets, dicts, one occurrence at a time), for cross-checking."""
  index = BruteForceIndex(docs)
  weights = {}
  for k, lp in zip(keys, logprobs):
    k = tuple(k)
    c = index.count(k)
    s = lp - 1e-10
    pc = (c + cfg.smoothing) / (index.num_tokens + cfg.smoothing)
    w = 0.0
    if c > 0:
      w = max(0.0, (s - math.log(1 - math.exp(s))) - (math.log(pc) - math.log(1 - pc))) ** cfg.alpha
    weights[k] = max(weights.get(k, 0.0), w)
  ranked = sorted((k for k, w in weights.items() if w > 0 and index.count(k) <= cfg.max_count),
                  key=lambda k: (-weights[k], k))

  def discount(k, seen):
    ks = set(k)
    return weights[k] * (1 - cfg.beta + cfg.beta * len(ks - seen) / len(ks))

  covered, first = set(), {}
  for k in (k for k in ranked if index.count(k) <= cfg.max_hits):
    for p in sorted(index._positions(k)):
      span = set(range(p, p + len(k)))
      if covered & span:
        continue
      covered |= span
      counted = first.setdefault(int(index.doc_of([p])[0]), [])
      if k not in counted:
        counted.append(k)
  stage1 = {}
  for d, ks in first.items():
    seen, tot = set(), 0.0
    for k in ks:
      tot += discount(k, seen)
      seen |= set(k)
    stage1[d] = tot
  cands = sorted(stage1, key=lambda d: (-stage1[d], d))[:cfg.fully_score]
  final = {}
  for d in cands:
    toks, free, seen, tot = docs[d], [True] * len(docs[d]), set(), 0.0
    for k in ranked:
      counted = False
      for p in range(len(toks) - len(k) + 1):
        if tuple(toks[p:p + len(k)]) == k and all(free[p:p + len(k)]):
          free[p:p + len(k)] = [False] * len(k)
          if not counted:
            tot += discount(k, seen)
            seen |= set(k)
            counted = True
    final[d] = tot
  order = sorted(final, key=lambda d: (-final[d], d))[:cfg.hits]
  return order, [final[d] for d in order]


@pytest.mark.parametrize("seed", range(6))
def test_matches_sequential_reference_on_random_corpora(seed):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(1, 6, size=rng.integers(3, 12)).tolist() for _ in range(12)]
  flat = [t for d in docs for t in d]
  keys = []
  for _ in range(25):
    d = docs[rng.integers(len(docs))]
    n = int(rng.integers(1, 4))
    if len(d) >= n:
      p = int(rng.integers(0, len(d) - n + 1))
      keys.append(tuple(d[p:p + n]))
  keys.append((5, 5, 5, 5, 5))  # probably absent
  logprobs = (-rng.exponential(1.0, size=len(keys))).tolist()
  cfg = ns.NgramScoringConfig(max_hits=int(rng.integers(2, 8)), fully_score=int(rng.integers(2, 13)),
                              hits=10, beta=float(rng.uniform(0, 0.95)), smoothing=1.0)
  assert flat
  want_docs, want_scores = _sequential_reference(docs, keys, logprobs, cfg)
  for make_index in [p.values[0] for p in INDEXES]:
    got = ns.score_documents(keys, logprobs, make_index(docs), cfg)
    assert got.doc_indices.tolist() == want_docs
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# docids


def test_docid_lookup_first_hit_order_and_dedup():
  lookup = docids.DocidLookup([(0, [5, 6]), (1, [5, 7]), (2, [8]), (3, [8]), (1, [9, 9])], strip_ids=[1])
  assert lookup.lookup([8, 1]) == (2, 3)  # shared identifier: both documents, in index order
  hyps = [[5, 7, 1], [4, 4], [8], [9, 9], [5, 6], [5, 7]]
  r = lookup.rank(hyps, scores=[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
  assert r.doc_indices.tolist() == [1, 2, 3, 0]
  assert r.scores.tolist() == [-0.1, -0.3, -0.3, -0.5]
  assert r.ranks.tolist() == [0, 2, 2, 4]
  assert (r.num_invalid, r.num_duplicates) == (1, 2)
  assert lookup.rank(hyps, k=2).doc_indices.tolist() == [1, 2]
  with pytest.raises(InputError):
    lookup.rank(hyps, scores=[0.0])
  with pytest.raises(InputError):
    docids.DocidLookup.from_identifiers([[1], []])


def test_hypotheses_from_beams():
  toks = np.array([[3, 4, 1, 0], [5, 1, 0, 0], [0, 0, 0, 0]])
  hyps, rows = docids.hypotheses_from_beams(toks, np.array([3, 2, 0]), valid=np.array([True, True, False]))
  assert hyps == [(3, 4, 1), (5, 1)] and rows.tolist() == [0, 1]
  lookup = docids.DocidLookup.from_identifiers([[3, 4], [5]], strip_ids=[1])
  assert lookup.rank(hyps).doc_indices.tolist() == [0, 1]


def test_hash_collisions_cannot_change_matches(monkeypatch):
  # With multiplier 0 a window's hash is its last token: keys of one length collide constantly.
  docs = [[1, 2, 3, 2, 3], [3, 1, 3, 3], [2, 2, 2, 1]]
  keys, lps = [(1, 3), (2, 3), (3, 3), (2, 2), (1,), (2, 2, 1)], [-0.5, -0.4, -0.3, -0.6, -0.9, -0.2]
  cfg = ns.NgramScoringConfig(smoothing=1.0)
  want = ns.score_documents(keys, lps, BruteForceIndex(docs), cfg)
  monkeypatch.setattr(ns, "_HASH_MULT", np.uint64(0))
  got = ns.score_documents(keys, lps, BruteForceIndex(docs), cfg)
  assert got.doc_indices.tolist() == want.doc_indices.tolist() and len(want.doc_indices) == 3
  np.testing.assert_allclose(got.scores, want.scores)
  assert got.doc_indices.tolist() == _sequential_reference(docs, keys, lps, cfg)[0]


@pytest.mark.parametrize("make_index", INDEXES)
def test_stats_put_every_key_in_one_category(make_index):
  """keys_in = the sum of the categories: a key listed twice and absent from the corpus was counted both as
  absent twice and as a duplicate."""
  index = make_index(DOCS)
  absent = (1, 1, 1, 1, 1)
  keys = [absent, absent, (), tuple(DOCS[0][:2]), tuple(DOCS[0][:2]), tuple(DOCS[1][:3])]
  res = ns.score_documents(keys, [-1.0, -1.0, -1.0, -0.5, -0.7, -0.2], index, ns.NgramScoringConfig())
  s = res.stats
  parts = ("keys_empty", "keys_duplicate", "keys_not_in_corpus", "keys_too_frequent", "keys_zero_weight",
           "keys_rare", "keys_frequent")
  assert (s["keys_empty"], s["keys_duplicate"], s["keys_not_in_corpus"]) == (1, 2, 1)
  assert sum(s[p] for p in parts) == s["keys_in"] == 6
