"""The three docid schemes that need no learning: atomic (DSI), naive string (doc id as text), title (GENRE)."""

from __future__ import annotations

import dataclasses

from genret_jax.corpora.types import Collection
from genret_jax.identifiers.base import DocidScheme, normalize_whitespace


class AtomicScheme(DocidScheme):
  """One new vocabulary token per document, `<d_{doc_idx}>` (DSI atomic docids)."""

  name = "atomic"

  @dataclasses.dataclass(frozen=True)
  class Config:
    token_prefix: str = "d"

  @classmethod
  def _check_config(cls, config) -> None:
    cls._check_token(config.token_prefix, "token_prefix")

  def _build(self, collection: Collection) -> None:
    self._set_docids([f"<{self.config.token_prefix}_{i}>" for i in range(len(collection.documents))])

  def added_tokens(self) -> list[str]:
    return list(self.docids)


class NaiveStringScheme(DocidScheme):
  """The document id itself, as text (DSI naive string docids)."""

  name = "naive"

  @dataclasses.dataclass(frozen=True)
  class Config:
    pass

  def _build(self, collection: Collection) -> None:
    self._set_docids([normalize_whitespace(d.doc_id) for d in collection.documents])

  def added_tokens(self) -> list[str]:
    return []


class TitleScheme(DocidScheme):
  """The document title (GENRE). Repeated titles get ` (2)`, ` (3)`, ... in document order; documents
  without a title fall back to `untitled <doc_id>`; both counts are kept in `report`."""

  name = "title"

  @dataclasses.dataclass(frozen=True)
  class Config:
    lowercase: bool = False

  def _build(self, collection: Collection) -> None:
    taken: set[str] = set()
    docids, duplicates, untitled = [], 0, 0
    all_titles = {self._clean(d.title) for d in collection.documents}
    for d in collection.documents:
      title = self._clean(d.title)
      if not title:
        untitled += 1
        title = f"untitled {normalize_whitespace(d.doc_id)}"
      candidate, k = title, 1
      # Skip suffixes that collide with another document's real title, so every identifier stays unique.
      while candidate in taken or (k > 1 and candidate in all_titles):
        k += 1
        candidate = f"{title} ({k})"
      duplicates += k > 1
      taken.add(candidate)
      docids.append(candidate)
    self._set_docids(docids)
    self.report = {"duplicate_titles_disambiguated": duplicates, "untitled_documents": untitled}

  def _clean(self, title: str) -> str:
    title = normalize_whitespace(title)
    return title.lower() if self.config.lowercase else title

  def _extra_state(self) -> dict:
    return {"report": self.report}

  def _set_state(self, state: dict) -> None:
    super()._set_state(state)
    self.report = dict(state.get("report", {}))

  def added_tokens(self) -> list[str]:
    return []
