"""JSON-lines records: the plain JSONL corpus reader and the helpers the BEIR reader shares.

A corpus line is an object with an id (`_id` or `id`), a `text` and an optional `title`; other fields are
ignored. Ids may be JSON strings or integers (kept as their decimal string).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

from genret_jax.corpora.builder import CollectionBuilder
from genret_jax.corpora.lines import PathLike, iter_lines
from genret_jax.corpora.normalize import normalize_document
from genret_jax.corpora.types import Collection, Document
from genret_jax.errors import InputError


def iter_json_records(path: PathLike, report: CollectionBuilder | None = None
                      ) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line_number, object) for each non-blank line; blank lines are counted in `report` if given."""
  path_s = str(path)
  for lineno, line in iter_lines(path):
    if not line.strip():
      if report is not None:
        report.count("blank_lines")
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"malformed JSON line: {e.msg} (column {e.colno})", path=path_s, line=lineno) from None
    if not isinstance(record, dict):
      raise InputError(f"expected a JSON object, found {type(record).__name__}", path=path_s, line=lineno)
    yield lineno, record


def get_id(record: dict[str, Any], names: Sequence[str], path: str, line: int) -> str:
  for name in names:
    if name in record:
      value = record[name]
      if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"field {name!r} must be a string or an integer, found {type(value).__name__}",
                         path=path, line=line)
      return str(value)
  raise InputError(f"missing required field {' or '.join(repr(n) for n in names)}", path=path, line=line)


def get_text(record: dict[str, Any], name: str, path: str, line: int, *, required: bool) -> str:
  if name not in record or record[name] is None:
    if required:
      raise InputError(f"missing required field {name!r}", path=path, line=line)
    return ""
  value = record[name]
  if not isinstance(value, str):
    raise InputError(f"field {name!r} must be a string, found {type(value).__name__}", path=path, line=line)
  return value


def read_documents(path: PathLike, builder: CollectionBuilder, *, normalize: bool = False,
                   max_docs: int | None = None) -> None:
  """Adds every document of a JSONL corpus file to `builder` (stops after `max_docs`, counting the rest)."""
  path_s = str(path)
  for lineno, record in iter_json_records(path, builder):
    if max_docs is not None and len(builder.documents) >= max_docs:
      builder.count("documents_beyond_max_docs")
      continue
    doc = Document(doc_id=get_id(record, ("_id", "id"), path_s, lineno),
                   title=get_text(record, "title", path_s, lineno, required=False),
                   text=get_text(record, "text", path_s, lineno, required=True))
    builder.add_document(normalize_document(doc) if normalize else doc, path_s, lineno)


def read_jsonl_corpus(path: PathLike, *, name: str | None = None, normalize: bool = False,
                      max_docs: int | None = None) -> Collection:
  """A corpus-only collection (no queries) from one JSONL(.gz) file."""
  path_s = str(path)
  builder = CollectionBuilder(name or _stem(path_s), source=os.path.abspath(path_s))
  read_documents(path, builder, normalize=normalize, max_docs=max_docs)
  return builder.build(empty_corpus_path=path_s)


def _stem(path: str) -> str:
  base = os.path.basename(path.rstrip("/"))
  for suffix in (".gz", ".jsonl", ".json", ".tsv", ".csv"):
    if base.endswith(suffix):
      base = base[: -len(suffix)]
  return base or "corpus"
