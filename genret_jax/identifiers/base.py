"""`IdentifierScheme`: the common interface of every identifier scheme, and its save/load format.

A scheme is built for one collection (document order = canonical document index) and saved together with a
fingerprint of that collection's documents; loading it against a different corpus is refused.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import os
import re
from typing import Any, ClassVar, Sequence

from genret_jax import atomic_files
from genret_jax.corpora.types import Collection, Document
from genret_jax.errors import InputError, check_float, check_int

FORMAT_VERSION = 1
MAX_SEED = 2**32 - 1   # scikit-learn's random_state range


def check_seed(seed, key: str = "seed") -> int:
  """A scheme seed: an integer in [0, 2**32 - 1] (scikit-learn rejects others with a traceback)."""
  seed = check_int(seed, key, low=0)
  if seed > MAX_SEED:
    raise InputError(f"must be an integer <= {MAX_SEED}, got {seed}", key=key)
  return seed


SCHEME_FILE = "scheme.json"

_WS = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
  return _WS.sub(" ", text).strip()


def document_text(doc: Document) -> str:
  """Title + body as one string (the indexing input). Skips the title when the body already repeats it."""
  title, body = normalize_whitespace(doc.title), normalize_whitespace(doc.text)
  if not title:
    return body
  if not body or body.startswith(title):
    return body or title
  return f"{title} {body}"


def collection_fingerprint(collection: Collection) -> str:
  """sha256 over (doc_id, title, text) of every document, in order. Queries do not enter it."""
  h = hashlib.sha256()
  for d in collection.documents:
    for field in (d.doc_id, d.title, d.text):
      b = field.encode("utf-8")
      h.update(len(b).to_bytes(8, "little"))
      h.update(b)
  return h.hexdigest()


class IdentifierScheme(abc.ABC):
  """Maps documents to identifier strings and back.

  Subclasses define `name`, a `Config` dataclass (their options, all with defaults), `_build(collection)`
  which fills the scheme's state, `_state()` / `_set_state(state)` (JSON-serialisable), and the mapping
  methods below.
  """

  name: ClassVar[str] = ""
  is_ngram: ClassVar[bool] = False
  # Option checks beyond the type of each option's default (`make_config`): bounds of numeric options
  # (`check_int` / `check_float` keyword arguments) and the allowed values of string options or tuple items.
  LIMITS: ClassVar[dict[str, dict]] = {}
  CHOICES: ClassVar[dict[str, tuple]] = {}

  @dataclasses.dataclass(frozen=True)
  class Config:
    pass

  def __init__(self, config: Any, seed: int, fingerprint: str, doc_ids: list[str]):
    self.config = config
    self.seed = int(seed)
    self.fingerprint = fingerprint
    self.doc_ids = doc_ids
    self._collection: Collection | None = None

  # ---- construction -------------------------------------------------------------------------------

  @classmethod
  def make_config(cls, **cfg) -> Any:
    """The scheme's Config from options (build-ids' --scheme_config), every option checked here, naming it as
    `scheme_config.<option>` (a string, float or out-of-range size otherwise failed inside scikit-learn, or was
    quietly turned into sequential ids)."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    for key in cfg:
      if key not in fields:
        raise InputError(f"unknown option for identifier scheme {cls.name!r}; known: {sorted(fields)}",
                         key=key)   # the bare name: tests/test_tasks.py relies on it
    config = cls.Config(**{k: cls._check_option(k, v, fields[k].default) for k, v in cfg.items()})
    cls._check_config(config)
    return config

  @classmethod
  def _check_option(cls, name: str, value, default):
    key = f"scheme_config.{name}"
    limits, choices = cls.LIMITS.get(name, {}), cls.CHOICES.get(name)
    if isinstance(default, bool):
      if not isinstance(value, bool):
        raise InputError(f"must be true or false, got {value!r}", key=key)
      return value
    if isinstance(default, int):
      return check_int(value, key, **{"low": 0, **limits})
    if isinstance(default, float):
      return check_float(value, key, **limits)
    if isinstance(default, str):
      if not isinstance(value, str):
        raise InputError(f"must be a string, got {value!r}", key=key)
      if choices is not None and value not in choices:
        raise InputError(f"must be one of {list(choices)}, got {value!r}", key=key)
      return value
    if isinstance(default, tuple):
      # JSON and gin hand over lists; tuples keep configs hashable and equal after a save/load round trip.
      if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"must be a list of strings, got {value!r}", key=key)
      if not value or (choices is not None and not set(value) <= set(choices)):
        allowed = f" from {list(choices)}" if choices is not None else ""
        raise InputError(f"must be a non-empty list of strings{allowed}, got {list(value)!r}", key=key)
      return tuple(value)
    return value

  @classmethod
  def _check_config(cls, config) -> None:
    """Checks that involve several options (subclasses)."""

  @staticmethod
  def _check_token(value: str, name: str) -> None:
    """An option that becomes (part of) an added vocabulary token."""
    if not value or any(c.isspace() for c in value):
      raise InputError(f"must be a non-empty string without whitespace (it becomes a vocabulary token), got "
                       f"{value!r}", key=f"scheme_config.{name}")

  @classmethod
  def build(cls, collection: Collection, seed: int = 0, **cfg) -> "IdentifierScheme":
    seed = check_seed(seed)
    config = cls.make_config(**cfg)
    if not collection.documents:
      raise InputError(f"cannot build identifiers for an empty collection {collection.name!r}",
                       path=collection.source or None)
    scheme = cls(config, seed, collection_fingerprint(collection),
                 [d.doc_id for d in collection.documents])
    scheme._collection = collection
    scheme._build(collection)
    return scheme

  @abc.abstractmethod
  def _build(self, collection: Collection) -> None:
    ...

  @abc.abstractmethod
  def _state(self) -> dict:
    ...

  @abc.abstractmethod
  def _set_state(self, state: dict) -> None:
    ...

  # ---- the interface ----------------------------------------------------------------------------

  @property
  def num_docs(self) -> int:
    return len(self.doc_ids)

  @property
  def collection(self) -> Collection:
    if self._collection is None:
      raise InputError(f"identifier scheme {self.name!r} was loaded without its collection; "
                       "pass collection= to identifiers.load()", key="collection")
    return self._collection

  def attach(self, collection: Collection, path: str | None = None) -> None:
    """Attaches the collection the scheme was built for; refuses any other corpus."""
    fp = collection_fingerprint(collection)
    if fp != self.fingerprint:
      raise InputError(f"identifier scheme was built for a different corpus (fingerprint "
                       f"{self.fingerprint[:12]}, collection {collection.name!r} has {fp[:12]})", path=path)
    self._collection = collection

  @abc.abstractmethod
  def added_tokens(self) -> list[str]:
    """Tokens the vocabulary must hold as single pieces, in a deterministic order."""

  @abc.abstractmethod
  def doc_identifiers(self, doc_idx: int) -> list[str]:
    """What the document is indexed as (and scored with in CGL for docid schemes)."""

  @abc.abstractmethod
  def retrieval_targets(self, query_text: str, doc_idx: int, seed: int) -> list[str]:
    """Training targets for (query, relevant document): [docid], or sampled spans for n-gram schemes."""

  def retrieval_targets_many(self, pairs: Sequence[tuple[str, int]], seed: int,
                             workers: int | None = None) -> list[list[str]]:
    """`retrieval_targets` of every (query text, document index) pair, in order. A scheme whose targets cost host
    time (the n-gram scheme's span sampling) spreads them over `workers` processes (None: as many as the host and
    the number of pairs suit); the result does not depend on `workers`."""
    del workers
    return [self.retrieval_targets(q, d, seed) for q, d in pairs]

  @abc.abstractmethod
  def indexing_examples(self, doc_idx: int) -> list[tuple[str, str]]:
    """(source, target) pairs that teach the model the document (document text -> identifier)."""

  @abc.abstractmethod
  def docs_for(self, identifier: str) -> list[int]:
    """Document indices an identifier stands for (one for docids; all containing docs for n-grams)."""

  # ---- persistence ---------------------------------------------------------------------------------

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "name": self.name,
        "seed": self.seed,
        "config": dataclasses.asdict(self.config),
        "fingerprint": self.fingerprint,
        "doc_ids": self.doc_ids,
        "state": self._state(),
    }
    path = os.path.join(directory, SCHEME_FILE)
    atomic_files.write_json(path, payload, ensure_ascii=False, sort_keys=True)
    return path

  @classmethod
  def from_payload(cls, payload: dict) -> "IdentifierScheme":
    config = cls.Config(**{k: (tuple(v) if isinstance(v, list) else v)
                           for k, v in payload["config"].items()})
    scheme = cls(config, payload["seed"], payload["fingerprint"], list(payload["doc_ids"]))
    scheme._set_state(payload["state"])
    return scheme

  def __eq__(self, other) -> bool:
    return (type(self) is type(other) and self.seed == other.seed and self.config == other.config
            and self.fingerprint == other.fingerprint and self._state() == other._state())

  def __repr__(self) -> str:
    return f"{type(self).__name__}(docs={self.num_docs}, seed={self.seed}, config={self.config})"


class DocidScheme(IdentifierScheme):
  """A scheme with exactly one identifier string per document (all but n-gram)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.docids: list[str] = []
    self._inverse: dict[str, int] = {}

  def _set_docids(self, docids: list[str]) -> None:
    inverse = {}
    for i, docid in enumerate(docids):
      if docid in inverse:
        # A scheme bug, not user input: identifiers must be unique by construction.
        raise AssertionError(f"{self.name}: documents {inverse[docid]} and {i} share identifier {docid!r}")
      inverse[docid] = i
    self.docids, self._inverse = docids, inverse

  def _state(self) -> dict:
    return {"docids": self.docids, **self._extra_state()}

  def _extra_state(self) -> dict:
    return {}

  def _set_state(self, state: dict) -> None:
    self._set_docids(list(state["docids"]))

  def doc_identifiers(self, doc_idx: int) -> list[str]:
    return [self.docids[doc_idx]]

  def retrieval_targets(self, query_text: str, doc_idx: int, seed: int) -> list[str]:
    del query_text, seed  # a docid target does not depend on the query
    return [self.docids[doc_idx]]

  def indexing_examples(self, doc_idx: int) -> list[tuple[str, str]]:
    text = document_text(self.collection.documents[doc_idx])
    return [(text, self.docids[doc_idx])] if text else []

  def docs_for(self, identifier: str) -> list[int]:
    i = self._inverse.get(identifier.strip())
    return [] if i is None else [i]
