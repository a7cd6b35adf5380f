"""Contrastive generation loss (CGL), the paper's metric, computed exactly as the reference does (method 1).

Pure numpy; the model side (`cgl_command.py`) produces, for every (query, document, identifier) sequence, the
summed token NLL and the number of target tokens (padding never counted) and hands them to this module.

Definitions (SLGR_BEHAVIOUR.md §5.1), per query q:

  l(q, d)  = mean token cross-entropy of generating d's identifiers given q
           = sum_i NLL(q, d, i) / sum_i tokens(q, d, i)             ("token" averaging, the reference's)
  l+(q)    = min over the query's positives of l(q, d)
  S-(q)    = sum over the query's n negatives of l(q, d)  (n = 256 by default)
  CGL(q)   = log(1 + l+(q) / S-(q))       chance level (all losses equal): log((n + 1) / n)
  CE(q)    = -log(exp(-l+) / (exp(-l+) + sum_j exp(-l-_j)))   the proper contrastive entropy, chance log(n + 1)
  ratio(q) = l+(q) / mean_j l-_j(q)        ~= n (exp(CGL) - 1), chance 1

The reported numbers are means over queries; the per-query values are kept so either metric can be
recomputed and bootstrapped.

The reference's per-document loss is the Hugging Face loss of one padded batch holding all of d's
identifiers, i.e. a token-weighted mean over the identifiers (longer identifiers weigh more) — "token"
averaging here, minus the reference's padding defect. The "identifier" option instead averages the
per-identifier token means, so every identifier counts equally.

Negatives are drawn once per query from a seeded generator keyed by (seed, query index), uniformly without
replacement from the corpus minus the query's positives, and saved with the results so every model of a
sweep is scored on identical negatives (the reference drew fresh unseeded ones per model and query).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from genret_jax import atomic_files, filesystem
from genret_jax.errors import InputError
from genret_jax.scaling import bootstrap

DEFAULT_NUM_NEGATIVES = 256
AVERAGING_MODES = ("token", "identifier")


def chance_cgl(num_negatives: int = DEFAULT_NUM_NEGATIVES) -> float:
  """CGL when every loss is equal: log((n + 1) / n); 0.0038986 for n = 256."""
  return math.log1p(1.0 / num_negatives)


def chance_contrastive_entropy(num_negatives: int = DEFAULT_NUM_NEGATIVES) -> float:
  """Contrastive entropy when every loss is equal: log(n + 1); 5.549 for n = 256."""
  return math.log(num_negatives + 1.0)


# ----------------------------------------------------------------------------------------------------------
# Negative sampling


@dataclasses.dataclass(frozen=True)
class NegativeSet:
  """Fixed negatives for every query of an evaluation: `negatives[i]` are document indices for query i."""

  negatives: np.ndarray  # [num_queries, num_negatives] int64 canonical document indices.
  seed: int
  num_docs: int
  query_ids: tuple[str, ...] | None = None

  @property
  def num_queries(self) -> int:
    return int(self.negatives.shape[0])

  @property
  def num_negatives(self) -> int:
    return int(self.negatives.shape[1])

  def fingerprint(self) -> str:
    """sha256 of the index array and its shape: equal fingerprints = identical negatives across models."""
    arr = np.ascontiguousarray(self.negatives, dtype=np.int64)
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()

  def save(self, path: str | os.PathLike) -> None:
    """Writes `.json` (readable) or `.npz` (compact) by suffix, atomically (temp file + rename)."""
    path = os.fspath(path)   # a str, not a pathlib.Path: Path("gs://b/x") is the local gs:/b/x
    suffix = os.path.splitext(path)[1]
    if suffix == ".npz":
      with atomic_files.atomic_open(path, "wb") as f:
        np.savez(f, negatives=self.negatives.astype(np.int64), seed=np.int64(self.seed),
                 num_docs=np.int64(self.num_docs),
                 query_ids=np.array(self.query_ids if self.query_ids is not None else [], dtype=str),
                 has_query_ids=np.bool_(self.query_ids is not None))
    elif suffix == ".json":
      payload = {"seed": int(self.seed), "num_docs": int(self.num_docs),
                 "num_negatives": self.num_negatives, "fingerprint": self.fingerprint(),
                 "query_ids": list(self.query_ids) if self.query_ids is not None else None,
                 "negatives": self.negatives.astype(np.int64).tolist()}
      atomic_files.write_json(path, payload)
    else:
      raise InputError("negatives file must end in .json or .npz", path=path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "NegativeSet":
    path = os.fspath(path)
    if not filesystem.exists(path):
      raise InputError("negatives file not found", path=path)
    try:
      if os.path.splitext(path)[1] == ".npz":
        with filesystem.open(path, "rb") as f, np.load(f) as z:
          qids = tuple(str(q) for q in z["query_ids"]) if bool(z["has_query_ids"]) else None
          return cls(np.asarray(z["negatives"], dtype=np.int64), int(z["seed"]), int(z["num_docs"]), qids)
      with filesystem.open(path) as f:
        payload = json.loads(f.read())
      rows = payload["negatives"]
      # (an object here failed inside int(); 1.5 or true was truncated to a document index without a word)
      if not (isinstance(rows, list) and all(isinstance(r, list) and all(type(d) is int for d in r) for r in rows)
              and len({len(r) for r in rows}) <= 1):
        raise InputError("'negatives' must be a rectangular list of lists of document indices", path=path,
                         key="negatives")
      negs = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1 if rows and rows[0] else 0)
      qids = payload.get("query_ids")
      out = cls(negs.astype(np.int64), int(payload["seed"]), int(payload["num_docs"]),
                tuple(qids) if qids is not None else None)
      if negs.size and not (0 <= negs.min() and negs.max() < out.num_docs):
        raise InputError(f"'negatives' holds document indices outside [0, {out.num_docs})", path=path,
                         key="negatives")
    # TypeError: a value of the wrong JSON type (an object for "negatives", a list for "seed", a list as the
    # whole file), which numpy or int() refused with a traceback.
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
      if isinstance(e, InputError):
        raise
      raise InputError(f"unreadable negatives file: {e}", path=path) from None
    if "fingerprint" in payload and payload["fingerprint"] != out.fingerprint():
      raise InputError("negatives fingerprint mismatch (file edited or truncated)", path=path,
                       key="fingerprint")
    return out


def _positives_list(positives: Mapping[int, Iterable[int]] | Sequence[Iterable[int]],
                    num_queries: int | None) -> list[np.ndarray]:
  if isinstance(positives, Mapping):
    n = num_queries if num_queries is not None else (max(positives) + 1 if positives else 0)
    return [np.asarray(sorted(set(int(d) for d in positives.get(i, ()))), dtype=np.int64) for i in range(n)]
  return [np.asarray(sorted(set(int(d) for d in p)), dtype=np.int64) for p in positives]


def sample_negatives(num_docs: int, positives_per_query: Mapping[int, Iterable[int]] | Sequence[Iterable[int]],
                     n: int = DEFAULT_NUM_NEGATIVES, seed: int = 0, *, num_queries: int | None = None,
                     query_ids: Sequence[str] | None = None, allow_fewer: bool = False) -> NegativeSet:
  """Seeded uniform negatives without replacement, excluding each query's positives.

  Args:
    num_docs: corpus size; documents are the canonical indices 0..num_docs-1.
    positives_per_query: per query (list position or dict key = query index) its positive doc indices.
    n: negatives per query (256 as in the paper).
    seed: query i uses `np.random.default_rng([seed, i])`, so a query's negatives do not depend on which
      other queries are present, and re-running gives identical sets.
    num_queries: number of queries when `positives_per_query` is a dict (default: max key + 1).
    query_ids: optional ids stored with the set.
    allow_fewer: on a corpus too small for n negatives, use the largest count every query can have
      (the chance level then is log((n'+1)/n')) instead of raising.

  Cost is O(n + |P|) per query (no corpus-sized set is built, unlike the reference).
  """
  pos = _positives_list(positives_per_query, num_queries)
  if query_ids is not None and len(query_ids) != len(pos):
    raise InputError(f"{len(query_ids)} query ids for {len(pos)} queries", key="query_ids")
  num_docs = int(num_docs)
  for i, p in enumerate(pos):
    if p.size and (p[0] < 0 or p[-1] >= num_docs):
      raise InputError(f"query {i}: positive document index out of range [0, {num_docs})", key="positives")
  max_pos = max((p.size for p in pos), default=0)
  available = num_docs - max_pos
  if available < n:
    if not allow_fewer or available <= 0:
      raise InputError(f"corpus of {num_docs} documents leaves only {available} negatives for some query; "
                       f"asked for {n} (lower num_negatives or pass allow_fewer)", key="num_negatives")
    n = available
  out = np.empty((len(pos), n), dtype=np.int64)
  for i, p in enumerate(pos):
    rng = np.random.default_rng([int(seed), i])
    # Draw ranks among the non-positive documents, then map rank k to the k-th non-positive index:
    # doc = k + #{positives p_j : p_j - j <= k} (positives sorted).
    ranks = rng.choice(num_docs - p.size, size=n, replace=False)
    out[i] = ranks + np.searchsorted(p - np.arange(p.size), ranks, side="right")
  return NegativeSet(out, int(seed), num_docs, tuple(query_ids) if query_ids is not None else None)


# ----------------------------------------------------------------------------------------------------------
# The metric


def document_loss(nll_sum: np.ndarray, num_tokens: np.ndarray, averaging: str = "token") -> np.ndarray:
  """l(q, d) from per-identifier summed NLLs and token counts; identifiers are the LAST axis.

  Identifiers with `num_tokens == 0` are absent (ragged identifier sets are padded with zeros) and ignored.
  "token": sum NLL / sum tokens over the identifiers (the reference's averaging).
  "identifier": mean over present identifiers of NLL_i / tokens_i.
  """
  if averaging not in AVERAGING_MODES:
    raise InputError(f"averaging must be one of {AVERAGING_MODES}, got {averaging!r}", key="averaging")
  nll = np.asarray(nll_sum, dtype=np.float64)
  tok = np.asarray(num_tokens, dtype=np.float64)
  if nll.shape != tok.shape:
    raise InputError(f"nll_sum shape {nll.shape} != num_tokens shape {tok.shape}", key="num_tokens")
  if np.any(tok < 0):
    raise InputError("negative token count", key="num_tokens")
  present = tok > 0
  count = present.sum(axis=-1)
  if np.any(count == 0):
    raise InputError("a document has no scored identifier tokens (all counts are 0)", key="num_tokens")
  if averaging == "token":
    return np.where(present, nll, 0.0).sum(axis=-1) / tok.sum(axis=-1)
  per_id = np.where(present, nll / np.where(present, tok, 1.0), 0.0)
  return per_id.sum(axis=-1) / count


@dataclasses.dataclass(frozen=True)
class CGLResult:
  """Per-query values and their means. Arrays are [num_queries] float64."""

  cgl: np.ndarray
  contrastive_entropy: np.ndarray
  ratio: np.ndarray
  ell_pos: np.ndarray
  s_neg: np.ndarray
  num_negatives: int

  @property
  def mean(self) -> float:
    return float(self.cgl.mean())

  def summary(self, num_resamples: int = 1000, seed: int = 0,
              confidence: float = bootstrap.DEFAULT_CONFIDENCE) -> dict:
    """Means with percentile-bootstrap CIs over queries, plus the chance levels."""
    out: dict = {"num_queries": int(self.cgl.size), "num_negatives": self.num_negatives,
                 "chance_cgl": chance_cgl(self.num_negatives),
                 "chance_ce": chance_contrastive_entropy(self.num_negatives), "confidence": confidence,
                 "bootstrap_resamples": int(num_resamples), "bootstrap_seed": int(seed)}
    for name, values in (("cgl", self.cgl), ("ce", self.contrastive_entropy), ("ratio", self.ratio)):
      m, lo, hi = bootstrap.mean_ci(values, num_resamples, seed, confidence)
      out[name] = m
      out[f"{name}_ci"] = [lo, hi]
    return out

  def per_query(self, query_ids: Sequence[str] | None = None) -> dict:
    """JSON-ready per-query values (the `per_query.json` format of docs/scaling.md)."""
    out = {"num_negatives": self.num_negatives, "cgl": self.cgl.tolist(),
           "ce": self.contrastive_entropy.tolist(), "ratio": self.ratio.tolist(),
           "ell_pos": self.ell_pos.tolist(), "s_neg": self.s_neg.tolist()}
    if query_ids is not None:
      out["query_ids"] = list(query_ids)
    return out


def cgl_from_losses(pos_losses: Sequence[Sequence[float]] | np.ndarray,
                    neg_losses: np.ndarray) -> CGLResult:
  """CGL, contrastive entropy and ratio per query from per-document losses.

  Args:
    pos_losses: per query, the losses of its positives (ragged list, or a 2-D array with NaN for absent).
    neg_losses: [num_queries, num_negatives] losses of the shared negatives.
  """
  neg = np.asarray(neg_losses, dtype=np.float64)
  if neg.ndim != 2 or neg.shape[1] == 0:
    raise InputError(f"neg_losses must be [num_queries, num_negatives], got shape {neg.shape}", key="neg_losses")
  if len(pos_losses) != neg.shape[0]:
    raise InputError(f"{len(pos_losses)} queries of positive losses for {neg.shape[0]} of negatives",
                     key="pos_losses")
  ell_pos = np.empty(neg.shape[0], dtype=np.float64)
  for i, p in enumerate(pos_losses):
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    p = p[~np.isnan(p)]
    if p.size == 0:
      raise InputError(f"query {i} has no positive loss (queries without positives must be skipped "
                       "and counted upstream)", key="pos_losses")
    ell_pos[i] = p.min()
  if not (np.all(np.isfinite(neg)) and np.all(np.isfinite(ell_pos))):
    raise InputError("non-finite loss", key="losses")
  if np.any(neg < 0) or np.any(ell_pos < 0):
    raise InputError("losses are negative log-likelihoods and must be >= 0", key="losses")
  s_neg = neg.sum(axis=1)
  cgl = np.log1p(ell_pos / s_neg)
  # -log softmax of the positive among {positive, negatives} with logits -l; logaddexp for stability.
  logits = np.concatenate([-ell_pos[:, None], -neg], axis=1)
  m = logits.max(axis=1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
  ce = lse + ell_pos
  ratio = ell_pos / neg.mean(axis=1)
  return CGLResult(cgl, ce, ratio, ell_pos, s_neg, int(neg.shape[1]))


def cgl_from_identifier_nll(pos_nll: Sequence[np.ndarray], pos_tokens: Sequence[np.ndarray],
                            neg_nll: np.ndarray, neg_tokens: np.ndarray,
                            averaging: str = "token") -> CGLResult:
  """CGL from per-(query, document, identifier) summed NLLs and token counts.

  Args:
    pos_nll, pos_tokens: per query, [num_positives_q, num_identifiers] arrays (zero tokens = absent id).
    neg_nll, neg_tokens: [num_queries, num_negatives, num_identifiers].
    averaging: "token" (reference) or "identifier"; see `document_loss`.
  """
  if len(pos_nll) != len(pos_tokens):
    raise InputError("pos_nll and pos_tokens have different numbers of queries", key="pos_tokens")
  pos = [document_loss(np.atleast_2d(n), np.atleast_2d(t), averaging) for n, t in zip(pos_nll, pos_tokens)]
  neg = document_loss(neg_nll, neg_tokens, averaging)
  return cgl_from_losses(pos, neg)
