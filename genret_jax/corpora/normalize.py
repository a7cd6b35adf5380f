"""Optional text normalisation, as the reference applies it to passage bodies (SLGR_BEHAVIOUR.md §1.1).

The reference does: collapse whitespace runs to one space, `ftfy.fix_text`, remove the literal markers
`BULLET::::` and `SECTION::::`, strip. Titles are only stripped. ftfy is not available in this environment, so
the mojibake repair step is skipped (a documented difference: text with broken encodings stays as it is).
Readers do not normalise unless asked (`load(..., normalize=True)`), so counts and texts match the files.
"""

from __future__ import annotations

import dataclasses
import re

from genret_jax.corpora.types import Collection, Document

_WHITESPACE = re.compile(r"\s+")
_MARKERS = ("BULLET::::", "SECTION::::")


def normalize_body(text: str) -> str:
  """Whitespace collapse + marker removal + strip (the reference's body normalisation, minus ftfy)."""
  text = _WHITESPACE.sub(" ", text)
  for marker in _MARKERS:
    text = text.replace(marker, "")
  return text.strip()


def normalize_title(title: str) -> str:
  return title.strip()


def normalize_document(doc: Document) -> Document:
  return dataclasses.replace(doc, title=normalize_title(doc.title), text=normalize_body(doc.text))


def normalize_collection(collection: Collection) -> Collection:
  """A copy of `collection` with every document normalised; queries and qrels are shared, not copied."""
  return Collection(
      name=collection.name,
      documents=[normalize_document(d) for d in collection.documents],
      queries=collection.queries,
      qrels=collection.qrels,
      source=collection.source,
      report=dict(collection.report, normalized=1))
