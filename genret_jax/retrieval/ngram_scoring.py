"""Document scoring from generated n-gram keys (the reference's `aggregate_evidence`, SEAL/MINDER), on the host.

Given the n-grams a constrained beam search produced for one query (each with its cumulative log-probability),
documents are scored in three steps (`docs/retrieval.md` has the full description and the worked example):

1. **Key weight** w = max(0, logit p_model(g|q) - logit p_corpus(g))^alpha with
   p_corpus = (count + smoothing) / (N_tok + smoothing).
2. **First stage.** "Rare" keys (count <= max_hits) in descending weight claim their corpus occurrences; an
   occurrence counts only if none of its positions is already claimed, and a key adds to a document at most once.
   The repetition-discounted sums pick the `fully_score` candidate documents.
3. **Full scoring.** In each candidate, the occurrences of *all* keys (rare and frequent) are taken greedily in
   descending weight without overlaps; a key's first accepted occurrence adds
   w * (1 - beta + beta * |set(g) minus C| / |set(g)|), where C is the set of token ids of the keys already counted
   in that document.

Deliberate differences from the reference (each also listed in `docs/retrieval.md`):

* The first-stage coverage window is the occurrence itself, [start, start + |g|). The reference uses
  [locate(row) - |g|, locate(row)) on an FM-index over reversed text, a window shifted off the occurrence
  (`SLGR_BEHAVIOUR.md` section 9, item 17).
* A key listed twice (the beam history holds the same n-gram from several steps and beams) keeps its *largest*
  weight; the reference keeps whichever came last (`duplicate_keys="last"` reproduces that).
* Ties are broken deterministically and independently of input order: keys by (-w, token tuple) -- the order the
  reference's full-scoring heap uses --, occurrences by position, documents by index.
* The dead special cases (token 45056, unigram set {0, 1, 2}), the unigram term and `single_key` (all off in SLGR)
  are not implemented. beta must be < 1, because at beta = 1 the reference lets a zero-contribution occurrence
  skip the overlap bookkeeping, an ordering effect not worth reproducing.

Everything that is per occurrence or per (document, token) pair is vectorised with numpy; only the loop over keys
(in weight order, because coverage is greedy) runs in Python.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import gin
import numpy as np

from genret_jax.errors import InputError

# Added to the reference's log-probability before the logit so that log(1 - e^s) stays finite at s = 0.
_LOGPROB_EPS = 1e-10
# Cumulative log-probabilities above this are not log-probabilities (tiny positive values are float rounding).
_LOGPROB_TOLERANCE = 1e-4
_SEPARATOR = -1


@runtime_checkable
class NgramIndex(Protocol):
  """What the scorer needs from the corpus index (`genret_jax.decoding.suffix_array.SuffixArrayIndex`).

  Positions are start offsets in one flat coordinate space in which no n-gram spans two documents (e.g. the
  concatenated, separator-delimited token array the suffix array is built over).
  """

  num_tokens: int

  def count(self, ngram: Sequence[int]) -> int:
    ...

  def occurrences(self, ngram: Sequence[int], limit: int) -> np.ndarray:
    ...

  def doc_of(self, positions: np.ndarray) -> np.ndarray:
    ...

  def doc_tokens(self, doc_idx: int) -> np.ndarray:
    ...


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NgramScoringConfig:
  """Parameters of n-gram document scoring; defaults are the reference's (`SEALSearcher.DEFAULTS`).

  Attributes:
    alpha: exponent of the key weight (`score_exponent`).
    beta: repetition discount in [0, 1): a key whose tokens all appear in keys already counted for the document
      keeps (1 - beta) of its weight (`repetition_penalty`).
    smoothing: added to the corpus count and the corpus size in p_corpus.
    length_penalty: the model log-probability is multiplied by (1 - length_penalty)^(|g| - 1) (0 = off).
    max_hits: keys occurring at most this often are "rare" (first stage + full scoring); more frequent keys are
      used only in full scoring. Also the cap on occurrences read per key.
    max_count: keys occurring more often than this are dropped.
    fully_score: number of first-stage candidates that are fully scored.
    hits: number of documents returned per query.
    allow_overlaps: count occurrences even when they overlap already-claimed positions (reference: False).
    duplicate_keys: "max" (a repeated key keeps its largest weight) or "last" (the reference's dict assignment).
    strip_token_ids: token ids removed from both ends of every key before scoring (e.g. EOS/pad a decoder
      appended); the reference strips (0, 1) for T5 and (0, 2) for LLaMA.
  """

  alpha: float = 2.0
  beta: float = 0.8
  smoothing: float = 5.0
  length_penalty: float = 0.0
  max_hits: int = 1500
  max_count: int = 10_000_000
  fully_score: int = 1500
  hits: int = 100
  allow_overlaps: bool = False
  duplicate_keys: str = "max"
  strip_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    def bad(field, why):
      raise InputError(f"{why} (got {getattr(self, field)!r})", key=f"NgramScoringConfig.{field}")

    if not self.alpha > 0:
      bad("alpha", "must be > 0")
    if not 0.0 <= self.beta < 1.0:
      bad("beta", "must be in [0, 1)")
    if not self.smoothing >= 0:
      bad("smoothing", "must be >= 0")
    if not 0.0 <= self.length_penalty < 1.0:
      bad("length_penalty", "must be in [0, 1)")
    for field in ("max_hits", "max_count", "fully_score", "hits"):
      if int(getattr(self, field)) < 1:
        bad(field, "must be >= 1")
    if self.max_count < self.max_hits:
      bad("max_count", "must be >= max_hits")
    if self.duplicate_keys not in ("max", "last"):
      bad("duplicate_keys", "must be 'max' or 'last'")
    object.__setattr__(self, "strip_token_ids", tuple(int(t) for t in self.strip_token_ids))


@dataclasses.dataclass
class NgramScores:
  """Ranked documents for one query.

  Attributes:
    doc_indices: [n] int64 canonical document indices, best first (n <= cfg.hits).
    scores: [n] float64 document scores, non-increasing.
    stats: counts of what happened to the keys (nothing is dropped silently).
    contributions: with `explain=True`, per returned document the (key, discounted weight) pairs that scored,
      in weight order; otherwise None.
  """

  doc_indices: np.ndarray
  scores: np.ndarray
  stats: dict[str, int]
  contributions: list[list[tuple[tuple[int, ...], float]]] | None = None


def key_weights(logprobs: np.ndarray, counts: np.ndarray, lengths: np.ndarray, num_tokens: int,
                cfg: NgramScoringConfig) -> np.ndarray:
  """w = max(0, logit(p_model) - logit(p_corpus))^alpha, vectorised; 0 where the count is 0.

  Args:
    logprobs: cumulative model log-probabilities of the keys (<= 0; -inf allowed and gives w = 0).
    counts: corpus occurrence counts of the keys.
    lengths: key lengths in tokens.
    num_tokens: corpus size N_tok (the index's `num_tokens`).
    cfg: scoring parameters.
  """
  sr = np.asarray(logprobs, dtype=np.float64)
  counts = np.asarray(counts, dtype=np.float64)
  lengths = np.asarray(lengths, dtype=np.float64)
  if np.isnan(sr).any():
    raise InputError("a key log-probability is NaN", key="logprobs")
  if (sr > _LOGPROB_TOLERANCE).any():
    raise InputError(f"key log-probabilities must be <= 0 (max {sr.max():.4g})", key="logprobs")
  s = (np.minimum(sr, 0.0) - _LOGPROB_EPS) * (1.0 - cfg.length_penalty) ** (lengths - 1.0)
  log_pc = np.log((counts + cfg.smoothing) / (float(num_tokens) + cfg.smoothing))
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    logit_model = s - np.log(-np.expm1(s))
    logit_corpus = log_pc - np.log(-np.expm1(log_pc))
    diff = logit_model - logit_corpus
  diff = np.where(np.isfinite(diff), diff, np.where(diff > 0, np.inf, 0.0))
  w = np.maximum(diff, 0.0) ** cfg.alpha
  return np.where(counts > 0, w, 0.0)


def accept_occurrences(starts: Sequence[np.ndarray], lengths: Sequence[int],
                       allow_overlaps: bool = False, space_size: int | None = None) -> list[np.ndarray]:
  """Greedy non-overlapping selection of occurrences, key by key in the given order.

  An occurrence [s, s + L) is accepted iff none of its positions is held by an occurrence accepted before it
  (earlier keys, or earlier positions of the same key); accepted occurrences hold their positions.

  Args:
    starts: per key, its occurrence start positions sorted ascending (int64).
    lengths: per key, its length.
    allow_overlaps: accept everything (the reference's `allow_overlaps=True`).
    space_size: when positions are known to lie in [0, space_size), a bitmap of that size is used directly;
      otherwise positions are first compacted to the ones some window touches.

  Returns:
    Per key, a boolean mask over its occurrences.
  """
  if allow_overlaps:
    return [np.ones(len(s), dtype=bool) for s in starts]
  windows = [np.asarray(s, np.int64)[:, None] + np.arange(n, dtype=np.int64) if len(s) else None
             for s, n in zip(starts, lengths)]
  if space_size is not None:
    universe = None
    covered = np.zeros(int(space_size), dtype=bool)
  else:
    nonempty = [w.ravel() for w in windows if w is not None]
    if not nonempty:
      return [np.zeros(len(s), dtype=bool) for s in starts]
    # Positions are compacted to the ones any window touches, so a plain bitmap tracks coverage however large
    # the corpus is.
    universe = np.unique(np.concatenate(nonempty))
    covered = np.zeros(len(universe), dtype=bool)
  out = []
  for s, n, win in zip(starts, lengths, windows):
    accepted = np.zeros(len(s), dtype=bool)
    if len(s):
      slots = win if universe is None else np.searchsorted(universe, win)
      cand = np.flatnonzero(~covered[slots].any(axis=1))
      if len(cand) > 1 and (np.diff(s[cand]) < n).any():
        # Occurrences of the same key overlap each other (e.g. "a a" in "a a a"): keep them left to right.
        keep, end = [], None
        for c in cand.tolist():
          if end is None or s[c] >= end:
            keep.append(c)
            end = s[c] + n
        cand = np.asarray(keep, dtype=np.int64)
      accepted[cand] = True
      covered[slots[cand].ravel()] = True
    out.append(accepted)
  return out


def discounted_scores(pair_keys: np.ndarray, pair_docs: np.ndarray, weights: np.ndarray,
                      token_sets: Sequence[np.ndarray], beta: float) -> np.ndarray:
  """Per (key, document) pair, the weight after the repetition discount, vectorised.

  A pair's token t is "new" iff no pair of the same document with a smaller key rank contains t; the pair then
  contributes w * (1 - beta + beta * new / |set(g)|). This equals the reference's sequential update of the
  covered token set C, because keys are counted in rank order.

  Args:
    pair_keys: [P] key ranks (0 = heaviest), each (key, doc) pair at most once.
    pair_docs: [P] document ids.
    weights: [K] key weights by rank.
    token_sets: [K] sorted unique token ids of each key.
    beta: repetition discount.
  """
  pair_keys = np.asarray(pair_keys, np.int64)
  pair_docs = np.asarray(pair_docs, np.int64)
  if not len(pair_keys):
    return np.zeros(0, np.float64)
  sizes = np.array([len(t) for t in token_sets], np.int64)
  ptr = np.concatenate([[0], np.cumsum(sizes)])
  flat = np.concatenate(token_sets).astype(np.int64)
  n_tok = sizes[pair_keys]
  pair_id = np.repeat(np.arange(len(pair_keys)), n_tok)
  offset = np.arange(n_tok.sum()) - np.repeat(np.cumsum(n_tok) - n_tok, n_tok)
  tok = flat[ptr[pair_keys][pair_id] + offset]
  doc = pair_docs[pair_id]
  rank = pair_keys[pair_id]
  order = np.lexsort((rank, tok, doc))
  first = np.ones(len(order), dtype=bool)
  first[1:] = (doc[order][1:] != doc[order][:-1]) | (tok[order][1:] != tok[order][:-1])
  new = np.bincount(pair_id[order][first], minlength=len(pair_keys))
  frac = new / sizes[pair_keys]
  return weights[pair_keys] * (1.0 - beta + beta * frac)


def _as_key(seq, strip: frozenset[int]) -> tuple[int, ...]:
  key = [int(t) for t in (seq.tolist() if isinstance(seq, np.ndarray) else seq)]
  i, j = 0, len(key)
  while i < j and key[i] in strip:
    i += 1
  while j > i and key[j - 1] in strip:
    j -= 1
  return tuple(key[i:j])


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def _find_in_docs(docs: Sequence[np.ndarray], keys: Sequence[tuple[int, ...]]):
  """All occurrences of `keys` in `docs`.

  Returns:
    (starts, local_docs, size): per key, its start positions in the separator-joined concatenation of `docs`
    (sorted) and the index into `docs` of each; and the length of the concatenation.
  """
  lens = np.array([len(d) for d in docs], np.int64)
  doc_start = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
  concat = np.full(int((lens + 1).sum()), _SEPARATOR, np.int64)
  for d, s in zip(docs, doc_start):
    concat[s:s + len(d)] = d
  size = len(concat)
  key_len = np.array([len(k) for k in keys], np.int64)
  max_len = int(key_len.max()) if len(keys) else 0
  # Polynomial hashes (mod 2^64) of every window, grown one length at a time; a hash hit is then checked
  # token by token, so collisions cannot create false matches.
  toks = concat.astype(np.uint64)
  hashes = np.zeros(size, np.uint64)
  hit_pos, hit_key = [], []
  with np.errstate(over="ignore"):
    for n in range(1, min(max_len, size) + 1):
      hashes = hashes[:size - n + 1] * _HASH_MULT + toks[n - 1:]
      ks = np.flatnonzero(key_len == n)
      if not len(ks):
        continue
      kt = np.array([keys[k] for k in ks], np.int64).reshape(len(ks), n)
      kh = np.zeros(len(ks), np.uint64)
      for j in range(n):
        kh = kh * _HASH_MULT + kt[:, j].astype(np.uint64)
      order = np.argsort(kh, kind="stable")
      sorted_kh = kh[order]
      pos = np.searchsorted(sorted_kh, hashes)
      cand = np.flatnonzero(sorted_kh[np.minimum(pos, len(ks) - 1)] == hashes)
      # Several keys of one length may share a hash: try each of them.
      hi = np.searchsorted(sorted_kh, hashes[cand], side="right")
      for shift in range(int((hi - pos[cand]).max()) if len(cand) else 0):
        sel = pos[cand] + shift < hi
        c = cand[sel]
        which = order[pos[c] + shift]
        windows = np.lib.stride_tricks.sliding_window_view(concat, n)[c]
        ok = (windows == kt[which]).all(axis=1)
        hit_pos.append(c[ok])
        hit_key.append(ks[which[ok]])
  starts: list[np.ndarray] = [np.zeros(0, np.int64)] * len(keys)
  if hit_pos:
    pos_all, key_all = np.concatenate(hit_pos), np.concatenate(hit_key)
    order = np.lexsort((pos_all, key_all))
    pos_all, key_all = pos_all[order], key_all[order]
    bounds = np.searchsorted(key_all, np.arange(len(keys) + 1))
    for k in np.flatnonzero(np.diff(bounds)):
      starts[k] = pos_all[bounds[k]:bounds[k + 1]]
  local_docs = [np.searchsorted(doc_start, s, side="right") - 1 for s in starts]
  return starts, local_docs, size


def _sorted_unique(a: np.ndarray) -> np.ndarray:
  """np.unique for an already sorted array, without its per-call overhead (called once per key)."""
  if len(a) < 2:
    return a
  return a[np.concatenate([[True], a[1:] != a[:-1]])]


def _doc_totals(pair_docs: np.ndarray, contrib: np.ndarray):
  docs, inv = np.unique(pair_docs, return_inverse=True)
  return docs, np.bincount(inv, weights=contrib, minlength=len(docs))


def _top(docs: np.ndarray, scores: np.ndarray, k: int):
  order = np.lexsort((docs, -scores))[:k]
  return docs[order], scores[order]


def score_documents(keys: Sequence[Sequence[int]], logprobs: Sequence[float], index: NgramIndex,
                    cfg: NgramScoringConfig | None = None, counts: Sequence[int] | None = None,
                    explain: bool = False) -> NgramScores:
  """Scores documents for one query from its generated keys.

  Args:
    keys: token-id sequences (the beam search's n-gram history for the query).
    logprobs: cumulative model log-probability of each key.
    index: corpus index (see `NgramIndex`).
    cfg: parameters; the reference's defaults when None.
    counts: corpus counts of the keys when already known (the suffix-array interval sizes from decoding); a key
      changed by `strip_token_ids` is recounted.
    explain: also return, per document, which keys scored and how much.
  """
  cfg = cfg or NgramScoringConfig()
  if len(keys) != len(logprobs) or (counts is not None and len(counts) != len(keys)):
    raise InputError(f"keys ({len(keys)}), logprobs ({len(logprobs)}) and counts "
                     f"({'-' if counts is None else len(counts)}) must have the same length", key="keys")
  strip = frozenset(cfg.strip_token_ids)
  stats = dict(keys_in=len(keys), keys_empty=0, keys_not_in_corpus=0, keys_duplicate=0, keys_too_frequent=0,
               keys_zero_weight=0, keys_rare=0, keys_frequent=0, candidates=0, fully_scored=0)

  norm, norm_lp, norm_cnt = [], [], []
  for i, raw in enumerate(keys):
    key = _as_key(raw, strip)
    if not key:
      stats["keys_empty"] += 1
      continue
    if min(key) < 0:
      raise InputError(f"key {i} has a negative token id: {key}", key="keys")
    known = counts is not None and len(key) == len(raw)
    norm.append(key)
    norm_lp.append(float(logprobs[i]))
    norm_cnt.append(int(counts[i]) if known else int(index.count(key)))
  lengths = np.array([len(k) for k in norm], np.int64)
  cnt = np.array(norm_cnt, np.int64)
  w = key_weights(np.array(norm_lp, np.float64), cnt, lengths, index.num_tokens, cfg) if norm else np.zeros(0)

  best: dict[tuple[int, ...], tuple[float, int]] = {}
  for key, wk, c in zip(norm, w.tolist(), cnt.tolist()):
    if key in best:
      stats["keys_duplicate"] += 1
      if cfg.duplicate_keys == "max" and best[key][0] >= wk:
        continue
    best[key] = (wk, c)
  kept = []
  # Distinct keys, one category each (a listed-twice absent key was counted twice).
  for key, (wk, c) in best.items():
    if c == 0:   # no occurrence: it cannot score a document
      stats["keys_not_in_corpus"] += 1
    elif c > cfg.max_count:
      stats["keys_too_frequent"] += 1
    elif wk <= 0.0:
      stats["keys_zero_weight"] += 1
    else:
      kept.append((-wk, key, c))
  kept.sort()
  all_keys = [k for _, k, _ in kept]
  weights = np.array([-nw for nw, _, _ in kept], np.float64)
  key_counts = np.array([c for _, _, c in kept], np.int64)
  rare = np.flatnonzero(key_counts <= cfg.max_hits)
  stats["keys_rare"] = int(len(rare))
  stats["keys_frequent"] = int(len(all_keys) - len(rare))
  empty = NgramScores(np.zeros(0, np.int64), np.zeros(0, np.float64), stats, [] if explain else None)
  if not len(rare):
    return empty
  token_sets = [np.unique(np.array(k, np.int64)) for k in all_keys]

  # First stage: rare keys claim corpus occurrences.
  starts = [_sorted_unique(np.sort(np.asarray(index.occurrences(all_keys[r], cfg.max_hits), np.int64)))
            for r in rare]
  accepted = accept_occurrences(starts, [len(all_keys[r]) for r in rare], cfg.allow_overlaps)
  pair_keys, pair_docs = [], []
  for r, s, acc in zip(rare, starts, accepted):
    if acc.any():
      docs = _sorted_unique(np.asarray(index.doc_of(s[acc]), np.int64))  # positions sorted -> docs sorted
      pair_keys.append(np.full(len(docs), r, np.int64))
      pair_docs.append(docs)
  if not pair_keys:
    return empty
  pk, pd = np.concatenate(pair_keys), np.concatenate(pair_docs)
  candidates = np.unique(pd)
  stats["candidates"] = int(len(candidates))
  if len(candidates) > cfg.fully_score:
    # The first-stage score only matters when it has to choose.
    docs, first = _doc_totals(pd, discounted_scores(pk, pd, weights, token_sets, cfg.beta))
    candidates = np.sort(_top(docs, first, cfg.fully_score)[0])
  stats["fully_scored"] = int(len(candidates))

  # Full scoring: all keys, occurrences found inside the candidate documents.
  doc_toks = [np.asarray(index.doc_tokens(int(d)), np.int64) for d in candidates]
  occ, occ_docs, size = _find_in_docs(doc_toks, all_keys)
  accepted = accept_occurrences(occ, [len(k) for k in all_keys], cfg.allow_overlaps, space_size=size)
  pair_keys, pair_docs = [], []
  for r, (acc, od) in enumerate(zip(accepted, occ_docs)):
    if acc.any():
      docs = _sorted_unique(od[acc])
      pair_keys.append(np.full(len(docs), r, np.int64))
      pair_docs.append(docs)
  pk, pd = np.concatenate(pair_keys), np.concatenate(pair_docs)
  contrib = discounted_scores(pk, pd, weights, token_sets, cfg.beta)
  local, totals = _doc_totals(pd, contrib)
  top_local, top_scores = _top(local, totals, cfg.hits)
  result = NgramScores(candidates[top_local], top_scores, stats)
  if explain:
    result.contributions = []
    for d in top_local.tolist():
      sel = np.flatnonzero(pd == d)
      sel = sel[np.argsort(pk[sel], kind="stable")]
      result.contributions.append([(all_keys[pk[i]], float(contrib[i])) for i in sel])
  return result
