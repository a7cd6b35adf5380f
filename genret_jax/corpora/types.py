"""The one data model every reader produces: documents, queries (with split), graded qrels, answers."""

from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class Query:
  query_id: str
  text: str
  split: str                      # "train" / "validation" / "test" / ...
  answers: tuple[str, ...] = ()   # NQ-style answer strings, when the collection has them


@dataclasses.dataclass
class Collection:
  """A corpus with its queries and judgments. Order of `documents` is the canonical doc index."""

  name: str
  documents: list[Document]
  queries: list[Query]
  # qrels[query_id][doc_id] = grade (higher = more relevant; grade <= 0 means judged non-relevant)
  qrels: dict[str, dict[str, int]]
  source: str = ""
  # Items a reader skipped or flagged, counted and reported, never silently dropped.
  report: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._doc_index = {d.doc_id: i for i, d in enumerate(self.documents)}

  def doc_index(self, doc_id: str) -> int:
    return self._doc_index[doc_id]

  def has_doc(self, doc_id: str) -> bool:
    return doc_id in self._doc_index

  def queries_in(self, split: str) -> list[Query]:
    return [q for q in self.queries if q.split == split]

  def positives(self, query_id: str, min_grade: int = 1) -> list[str]:
    return [d for d, g in self.qrels.get(query_id, {}).items() if g >= min_grade]

  @property
  def splits(self) -> list[str]:
    return sorted({q.split for q in self.queries})


QrelsMap = Mapping[str, Mapping[str, int]]
