"""Identifier schemes (atomic, naive string, semantic, codebook, title, n-gram multiview) and the vocabulary.

  scheme = identifiers.build("semantic", collection, seed=0, branching=10, leaf_size=100)
  scheme.save(dir); scheme = identifiers.load(dir, collection)   # refuses a different corpus
"""

from __future__ import annotations

import json
import os

from genret_jax.corpora.types import Collection
from genret_jax.errors import InputError
from genret_jax.identifiers.base import (SCHEME_FILE, DocidScheme, IdentifierScheme, collection_fingerprint,
                                         document_text)
from genret_jax.identifiers.learned_schemes import CodebookScheme, SemanticScheme
from genret_jax.identifiers.ngram import NgramScheme
from genret_jax.identifiers.simple_schemes import AtomicScheme, NaiveStringScheme, TitleScheme

SCHEMES: dict[str, type[IdentifierScheme]] = {
    cls.name: cls
    for cls in (AtomicScheme, NaiveStringScheme, SemanticScheme, CodebookScheme, TitleScheme, NgramScheme)
}
# Longer names people will type.
ALIASES = {"naive_string": "naive", "string": "naive", "hkmeans": "semantic", "rq": "codebook",
           "ripor": "codebook", "genre": "title", "minder": "ngram", "seal": "ngram", "multiview": "ngram"}


def scheme_class(name: str) -> type[IdentifierScheme]:
  key = ALIASES.get(name, name)
  if key not in SCHEMES:
    raise InputError(f"unknown identifier scheme {name!r}; choose from {sorted(SCHEMES)}", key="scheme")
  return SCHEMES[key]


def build(scheme_name: str, collection: Collection, seed: int = 0, **cfg) -> IdentifierScheme:
  """Builds a scheme for `collection` (deterministic given seed and cfg)."""
  return scheme_class(scheme_name).build(collection, seed=seed, **cfg)


def load(directory: str, collection: Collection | None = None) -> IdentifierScheme:
  """Loads a saved scheme. With `collection`, checks it is the corpus the scheme was built for."""
  path = os.path.join(directory, SCHEME_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      payload = json.load(f)
  except FileNotFoundError as e:
    raise InputError("no saved identifier scheme here", path=path) from e
  except json.JSONDecodeError as e:
    raise InputError(f"corrupt identifier scheme file: {e.msg}", path=path, line=e.lineno) from e
  if payload.get("format_version") != 1:
    raise InputError(f"unsupported scheme format_version {payload.get('format_version')!r}", path=path)
  scheme = scheme_class(payload["name"]).from_payload(payload)
  if collection is not None:
    scheme.attach(collection, path=path)
  return scheme


__all__ = ["IdentifierScheme", "DocidScheme", "SCHEMES", "build", "load", "collection_fingerprint",
           "document_text", "scheme_class", "AtomicScheme", "NaiveStringScheme", "SemanticScheme",
           "CodebookScheme", "TitleScheme", "NgramScheme"]
