"""Accumulates documents, queries and qrels with the checks every reader shares, then builds a `Collection`.

Errors name the file and line of the offending record (and of the first occurrence, for duplicates); the
things that are kept but worth knowing (empty documents, unjudged queries, ...) are counted in
`Collection.report` so `genret inspect` can show them.
"""

from __future__ import annotations

import collections
from typing import Iterable

from genret_jax.corpora.types import Collection, Document, Query
from genret_jax.errors import InputError

# Report keys every collection carries (0 when nothing was flagged), so consumers can rely on them.
STANDARD_REPORT_KEYS = ("empty_documents", "empty_text", "unjudged_queries")


def is_empty_document(doc: Document) -> bool:
  return not (doc.title.strip() or doc.text.strip())


def flag_counts(documents: Iterable[Document], queries: Iterable[Query],
                qrels: dict[str, dict[str, int]]) -> dict[str, int]:
  """The standard report counts, recomputed from the data (used after any transformation)."""
  empty_docs = empty_text = 0
  for d in documents:
    empty_docs += is_empty_document(d)
    empty_text += not d.text.strip()
  queries = list(queries)
  unjudged = sum(1 for q in queries if not qrels.get(q.query_id))
  out = {"empty_documents": empty_docs, "empty_text": empty_text, "unjudged_queries": unjudged}
  empty_queries = sum(1 for q in queries if not q.text.strip())
  if empty_queries:   # kept (ids and splits stay as in the file), but a model gets nothing to read
    out["empty_queries"] = empty_queries
  return out


def _where(loc: tuple[str, int | None]) -> str:
  return f"{loc[0]}:{loc[1]}" if loc[1] is not None else loc[0]


class CollectionBuilder:
  """Collects records from one or more files, checking ids and references as they arrive."""

  def __init__(self, name: str, source: str):
    self.name, self.source = name, source
    self.documents: list[Document] = []
    self.queries: list[Query] = []
    self.qrels: dict[str, dict[str, int]] = {}
    self.report: collections.Counter[str] = collections.Counter()
    # When set (a corpus cut with max_docs), qrels naming documents past the cut are counted under this key
    # instead of being errors.
    self.unknown_doc_qrels_key: str | None = None
    # id -> (path, line) of first occurrence; the path string object is shared, so this stays small.
    self._doc_where: dict[str, tuple[str, int | None]] = {}
    self._query_where: dict[str, tuple[str, int | None]] = {}
    self._qrel_where: dict[tuple[str, str], tuple[str, int | None]] = {}

  def count(self, key: str, n: int = 1) -> None:
    self.report[key] += n

  def add_document(self, doc: Document, path: str, line: int | None) -> None:
    if not doc.doc_id:
      raise InputError("empty document id", path=path, line=line)
    first = self._doc_where.get(doc.doc_id)
    if first is not None:
      raise InputError(f"duplicate document id {doc.doc_id!r} (first seen at {_where(first)})", path=path, line=line)
    self._doc_where[doc.doc_id] = (path, line)
    self.documents.append(doc)

  def has_document(self, doc_id: str) -> bool:
    return doc_id in self._doc_where

  def has_query(self, query_id: str) -> bool:
    return query_id in self._query_where

  def add_query(self, query: Query, path: str, line: int | None) -> None:
    if not query.query_id:
      raise InputError("empty query id", path=path, line=line)
    first = self._query_where.get(query.query_id)
    if first is not None:
      raise InputError(f"duplicate query id {query.query_id!r} (first seen at {_where(first)})", path=path, line=line)
    self._query_where[query.query_id] = (path, line)
    self.queries.append(query)

  def add_qrel(self, query_id: str, doc_id: str, grade: int, path: str, line: int) -> None:
    if query_id not in self._query_where:
      raise InputError(f"qrels name unknown query id {query_id!r} (not in the queries file)", path=path, line=line)
    if doc_id not in self._doc_where:
      if self.unknown_doc_qrels_key:
        self.count(self.unknown_doc_qrels_key)
        return
      raise InputError(f"qrels name unknown document id {doc_id!r} (not in the corpus)", path=path, line=line)
    key = (query_id, doc_id)
    judged = self.qrels.setdefault(query_id, {})
    if doc_id in judged:
      if judged[doc_id] != grade:
        raise InputError(
            f"conflicting grades for query {query_id!r}, document {doc_id!r}: {judged[doc_id]} at "
            f"{_where(self._qrel_where[key])} and {grade} here", path=path, line=line)
      self.count("duplicate_qrels")
      return
    self._qrel_where[key] = (path, line)
    judged[doc_id] = grade

  def build(self, *, empty_corpus_path: str | None = None, require_documents: bool = True) -> Collection:
    if require_documents and not self.documents:
      raise InputError("empty corpus: no documents found", path=empty_corpus_path or self.source)
    report = dict(self.report)
    report.update(flag_counts(self.documents, self.queries, self.qrels))
    return Collection(name=self.name, documents=self.documents, queries=self.queries, qrels=self.qrels,
                      source=self.source, report=report)
