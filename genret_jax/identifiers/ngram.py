"""N-gram multiview identifiers (MINDER/SEAL, the paper's main method).

The document string is `title <title_eos> body [<pq_bos> pseudo-query <pq_eos>]...`: any word n-gram of
it identifies every document that contains it (many-to-one). Retrieval targets are query-biased body
spans sampled as the reference does (`spans.py`), optionally with the title view and pseudo-query views.
Markers are added tokens by default; set them to `<extra_id_99>` / `<extra_id_97>` for T5's vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from genret_jax.corpora.types import Collection
from genret_jax.errors import InputError
from genret_jax.identifiers.base import IdentifierScheme, normalize_whitespace
from genret_jax.identifiers.spans import extract_spans_many

VIEWS = ("body", "title", "query")


class NgramScheme(IdentifierScheme):
  """Documents as multiview strings; identifiers are their word n-grams."""

  name = "ngram"
  is_ngram = True
  LIMITS = {"n_samples": {"low": 1}, "min_length": {"low": 1}, "max_length": {"low": 1},
            "temperature": {"low": 0.0, "low_open": True}, "title_samples": {"low": 1}, "query_samples": {"low": 1},
            "index_pairs": {"low": 0}, "index_source_words": {"low": 1}}
  CHOICES = {"views": VIEWS}

  @dataclasses.dataclass(frozen=True)
  class Config:
    views: tuple[str, ...] = ("body",)   # retrieval-target views; SLGR's LLaMA runs use body spans only
    n_samples: int = 10
    min_length: int = 10
    max_length: int = 10
    temperature: float = 1.0
    title_samples: int = 3
    query_samples: int = 5
    title_marker: str = "<title_eos>"
    query_bos: str = "<pq_bos>"
    query_eos: str = "<pq_eos>"
    index_pairs: int = 2                 # unsupervised (span -> span) pairs per document
    index_source_words: int = 64
    pseudo_queries_file: str = ""        # JSON {doc_id: [pseudo-query, ...]}, when the corpus has them

  @classmethod
  def _check_config(cls, config) -> None:
    if config.min_length > config.max_length:
      raise InputError(f"min_length {config.min_length} > max_length {config.max_length}",
                       key="scheme_config.min_length")
    for name in ("title_marker", "query_bos", "query_eos"):
      cls._check_token(getattr(config, name), name)

  def _build(self, collection: Collection) -> None:
    cfg = self.config   # checked by make_config
    self.pseudo_queries: dict[int, list[str]] = {}
    if cfg.pseudo_queries_file:
      self.pseudo_queries = self._read_pseudo_queries(collection, cfg.pseudo_queries_file)
    self._prepare()

  @staticmethod
  def _read_pseudo_queries(collection: Collection, path: str) -> dict[int, list[str]]:
    try:
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise InputError(f"cannot read pseudo-queries: {e}", path=path) from e
    if not isinstance(raw, dict):
      raise InputError("pseudo-queries must be a JSON object {doc_id: [query, ...]}", path=path)
    out = {}
    for doc_id, queries in raw.items():
      if not collection.has_doc(doc_id):
        raise InputError(f"pseudo-queries name unknown document {doc_id!r}", path=path, key=doc_id)
      if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise InputError("pseudo-queries of a document must be a list of strings", path=path, key=doc_id)
      cleaned = [normalize_whitespace(q) for q in queries if q.strip()]
      if cleaned:
        out[collection.doc_index(doc_id)] = cleaned
    return dict(sorted(out.items()))

  def _prepare(self) -> None:
    self._postings: dict[str, list[int]] | None = None
    self._doc_strings: list[str] | None = None

  def _state(self) -> dict:
    return {"pseudo_queries": {str(k): v for k, v in self.pseudo_queries.items()}}

  def _set_state(self, state: dict) -> None:
    self.pseudo_queries = {int(k): list(v) for k, v in state["pseudo_queries"].items()}
    self._prepare()

  # ---- views --------------------------------------------------------------------------------------

  def title_view(self, doc_idx: int) -> str:
    title = normalize_whitespace(self.collection.documents[doc_idx].title)
    return f"{title} {self.config.title_marker}" if title else self.config.title_marker

  def body_words(self, doc_idx: int) -> list[str]:
    return self.collection.documents[doc_idx].text.split()

  def query_views(self, doc_idx: int) -> list[str]:
    cfg = self.config
    return [f"{cfg.query_bos} {q} {cfg.query_eos}" for q in self.pseudo_queries.get(doc_idx, [])]

  def document_string(self, doc_idx: int) -> str:
    """What a suffix array indexes for this document (views joined by single spaces)."""
    parts = [self.title_view(doc_idx), " ".join(self.body_words(doc_idx)), *self.query_views(doc_idx)]
    return " ".join(p for p in parts if p)

  # ---- the interface ----------------------------------------------------------------------------

  def added_tokens(self) -> list[str]:
    cfg = self.config
    return [cfg.title_marker, cfg.query_bos, cfg.query_eos]

  def doc_identifiers(self, doc_idx: int) -> list[str]:
    body = " ".join(self.body_words(doc_idx))
    return [v for v in [self.title_view(doc_idx), body, *self.query_views(doc_idx)] if v]

  def retrieval_targets(self, query_text: str, doc_idx: int, seed: int) -> list[str]:
    return self.retrieval_targets_many([(query_text, doc_idx)], seed, workers=1)[0]

  def retrieval_targets_many(self, pairs: Sequence[tuple[str, int]], seed: int,
                             workers: int | None = None) -> list[list[str]]:
    cfg = self.config
    body: list[list[str]] = [[] for _ in pairs]
    if "body" in cfg.views:   # the span sampling is the cost (fuzzy matching), so it is what runs in parallel
      # The document's text, split where the job runs exactly as `body_words` splits it.
      texts = self.collection.documents
      body = extract_spans_many([(q, texts[d].text, d) for q, d in pairs], seed, workers=workers,
                                n_samples=cfg.n_samples, min_length=cfg.min_length, max_length=cfg.max_length,
                                temperature=cfg.temperature)
    return [self._targets(d, spans) for (_, d), spans in zip(pairs, body)]

  def _targets(self, doc_idx: int, body_spans: list[str]) -> list[str]:
    cfg = self.config
    targets: list[str] = []
    has_title = bool(self.collection.documents[doc_idx].title.strip())
    for view in cfg.views:
      if view == "body":
        targets += body_spans
      elif view == "title" and has_title:
        targets += [self.title_view(doc_idx)] * cfg.title_samples
      elif view == "query":
        pqs = self.query_views(doc_idx)
        targets += [pqs[min(k, len(pqs) - 1)] for k in range(cfg.query_samples)] if pqs else []
    if not targets and has_title:
      targets = [self.title_view(doc_idx)]  # empty body: the title is the only identifier left
    return targets

  def indexing_examples(self, doc_idx: int) -> list[tuple[str, str]]:
    """MINDER-style unsupervised pairs: body start -> title view, random body window -> random span."""
    cfg = self.config
    words = self.body_words(doc_idx)
    title = normalize_whitespace(self.collection.documents[doc_idx].title)
    pairs = []
    if title:
      pairs.append((" ".join(words[:cfg.index_source_words]) or title, self.title_view(doc_idx)))
    if words:
      rng = np.random.default_rng([self.seed & 0xFFFFFFFF, doc_idx, 1])
      for _ in range(cfg.index_pairs):
        s = int(rng.integers(0, max(1, len(words) - cfg.index_source_words + 1)))
        t = int(rng.integers(0, len(words)))
        length = int(rng.integers(cfg.min_length, cfg.max_length + 1))
        pairs.append((" ".join(words[s:s + cfg.index_source_words]), " ".join(words[t:t + length])))
    return pairs

  def docs_for(self, identifier: str) -> list[int]:
    words = identifier.split()
    if not words:
      return []
    if self._postings is None:
      self._doc_strings = [f" {self.document_string(i)} " for i in range(self.num_docs)]
      postings: dict[str, list[int]] = {}
      for i, s in enumerate(self._doc_strings):
        for w in set(s.split()):
          postings.setdefault(w, []).append(i)
      self._postings = postings
    lists = sorted((self._postings.get(w, []) for w in set(words)), key=len)
    candidates = set(lists[0]).intersection(*lists[1:])
    needle = f" {' '.join(words)} "
    return sorted(i for i in candidates if needle in self._doc_strings[i])
