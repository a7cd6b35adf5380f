"""Docid schemes learned from document vectors: semantic (hierarchical k-means, DSI/NCI) and codebook
(residual quantisation, RIPOR-style). Vectors are TF-IDF + TruncatedSVD (`doc_vectors.py`)."""

from __future__ import annotations

import collections
import dataclasses
import warnings

import numpy as np
import threadpoolctl

from genret_jax.corpora.types import Collection
from genret_jax.identifiers.base import DocidScheme
from genret_jax.identifiers.doc_vectors import tfidf_svd_vectors


def _node_seed(seed: int, *path: int) -> int:
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, len(path), *path]).generate_state(1)[0])


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
  # scikit-learn is imported where it is used: importing it costs ~1 s, paid by every process that imports
  # genret_jax.identifiers (the span-sampling workers among them) otherwise.
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1):
    warnings.simplefilter("ignore")  # duplicate points -> fewer distinct clusters; handled by the caller
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(points)


class SemanticScheme(DocidScheme):
  """Hierarchical k-means docids: cluster into `branching` groups, recurse into groups larger than
  `leaf_size`, and number the documents of a leaf 0..n-1 in document order.

  `token_format="digits"` writes the path as space-separated integers ("3 1 27"), tokenised as text;
  `"tokens"` writes one added, position-specific token per level ("<s0_3><s1_1><s2_27>", NCI-style).
  """

  name = "semantic"
  LIMITS = {"branching": {"low": 2}, "leaf_size": {"low": 1}, "dim": {"low": 1}, "max_features": {"low": 1}}
  CHOICES = {"token_format": ("digits", "tokens")}

  @dataclasses.dataclass(frozen=True)
  class Config:
    branching: int = 10
    leaf_size: int = 100
    dim: int = 64
    max_features: int = 20000
    token_format: str = "digits"

  def _build(self, collection: Collection) -> None:
    cfg = self.config   # checked by make_config
    vectors = tfidf_svd_vectors(collection, cfg.dim, self.seed, cfg.max_features)
    paths: list[tuple[int, ...]] = [()] * len(vectors)
    stack = [((), np.arange(len(vectors)))]
    while stack:
      prefix, idx = stack.pop()
      if len(idx) <= cfg.leaf_size:
        for pos, i in enumerate(idx):
          paths[i] = prefix + (pos,)
        continue
      k = min(cfg.branching, len(idx))
      labels = _kmeans(vectors[idx], k, _node_seed(self.seed, *prefix)).labels_
      if len(np.unique(labels)) < 2:
        # Identical vectors (e.g. empty documents) cannot be split by k-means: split them by order instead.
        labels = np.arange(len(idx)) * k // len(idx)
      for c in range(k):
        sub = idx[labels == c]
        if len(sub):
          stack.append((prefix + (c,), sub))
    self.paths = [list(p) for p in paths]
    self._set_docids([self._format(p) for p in paths])

  def _format(self, path) -> str:
    if self.config.token_format == "digits":
      return " ".join(str(v) for v in path)
    return "".join(f"<s{depth}_{v}>" for depth, v in enumerate(path))

  def _extra_state(self) -> dict:
    return {"paths": self.paths}

  def _set_state(self, state: dict) -> None:
    super()._set_state(state)
    self.paths = [list(p) for p in state["paths"]]

  def added_tokens(self) -> list[str]:
    if self.config.token_format == "digits":
      return []
    used = sorted({(depth, v) for p in self.paths for depth, v in enumerate(p)})
    return [f"<s{depth}_{v}>" for depth, v in used]


class CodebookScheme(DocidScheme):
  """Residual quantisation into `levels` codes of `codes` values, each an added position-specific token
  `<c{level}_{code}>` (RIPOR keeps a separate vocabulary per position).

  Collisions (documents with equal code tuples) are resolved deterministically: when any exist, every
  document gets one more token `<c{levels}_{j}>`, j = its rank in document order among the documents
  sharing its codes, so all identifiers keep one length.
  """

  name = "codebook"
  LIMITS = {"levels": {"low": 1}, "codes": {"low": 2}, "dim": {"low": 1}, "max_features": {"low": 1}}

  @dataclasses.dataclass(frozen=True)
  class Config:
    levels: int = 3
    codes: int = 32
    dim: int = 64
    max_features: int = 20000

  def _build(self, collection: Collection) -> None:
    cfg = self.config   # checked by make_config
    vectors = tfidf_svd_vectors(collection, cfg.dim, self.seed, cfg.max_features)
    residual = vectors.copy()
    codes = np.zeros((len(vectors), cfg.levels), dtype=np.int64)
    for level in range(cfg.levels):
      distinct = len(np.unique(residual.round(12), axis=0))
      k = min(cfg.codes, distinct)
      if k < 2:
        break  # nothing left to separate; remaining levels stay code 0
      km = _kmeans(residual, k, _node_seed(self.seed, level))
      codes[:, level] = km.labels_
      residual = residual - km.cluster_centers_[km.labels_]
    groups: dict[tuple, int] = collections.Counter()
    rank = []
    for row in codes:
      key = tuple(row.tolist())
      rank.append(groups[key])
      groups[key] += 1
    self.max_collision = max(groups.values())
    self.codes = codes.tolist()
    self.ranks = rank
    self._set_docids([self._format(c, r) for c, r in zip(self.codes, rank)])
    self.report = {"colliding_documents": int(sum(v for v in groups.values() if v > 1)),
                   "max_collision_group": int(self.max_collision)}

  def _format(self, code_row, rank: int) -> str:
    s = "".join(f"<c{level}_{c}>" for level, c in enumerate(code_row))
    if self.max_collision > 1:
      s += f"<c{self.config.levels}_{rank}>"
    return s

  def _extra_state(self) -> dict:
    return {"codes": self.codes, "ranks": self.ranks, "max_collision": self.max_collision,
            "report": self.report}

  def _set_state(self, state: dict) -> None:
    super()._set_state(state)
    self.codes, self.ranks = state["codes"], state["ranks"]
    self.max_collision, self.report = state["max_collision"], state["report"]

  def added_tokens(self) -> list[str]:
    cfg = self.config
    tokens = [f"<c{level}_{c}>" for level in range(cfg.levels) for c in range(cfg.codes)]
    if self.max_collision > 1:
      tokens += [f"<c{cfg.levels}_{j}>" for j in range(self.max_collision)]
    return tokens
