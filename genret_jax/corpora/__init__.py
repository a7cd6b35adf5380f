"""Corpora: readers that turn BEIR directories, DPR passage TSVs, JSONL corpora, NQ question files and
ir_datasets names into the one data model (`Collection`), plus the embedded default corpus.

Entry points: `load(path_or_name, format=None, **kw)` and `load_questions(path, ...)`.
"""

from __future__ import annotations

import os

from genret_jax.corpora.types import Collection, Document, Query
from genret_jax.errors import InputError, check_int

FORMATS = ("beir", "dpr", "jsonl", "ir_datasets", "default")
DEFAULT_NAME = "default"


def _first_line(path: str) -> str:
  from genret_jax.corpora.lines import iter_lines
  for _, line in iter_lines(path):
    if line.strip():
      return line
  return ""


def detect_format(path_or_name: str) -> str:
  """Guesses the format of a path or name; raises InputError with a hint when it cannot."""
  from genret_jax.corpora import beir, irds
  p = str(path_or_name)
  if p.startswith(irds.PREFIX):
    return "ir_datasets"
  if not os.path.exists(p):
    if p == DEFAULT_NAME:
      return "default"
    if irds.available():
      return "ir_datasets"
    raise InputError("no such file or directory (and ir_datasets is not installed, so it is not read as a "
                     "dataset name)", path=p)
  if os.path.isdir(p):
    if beir.is_beir_dir(p):
      return "beir"
    raise InputError("directory has no corpus.jsonl or corpus.jsonl.gz (BEIR layout expected)", path=p)
  base = p[:-3] if p.endswith(".gz") else p
  if base.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  if base.endswith(".csv"):
    raise InputError("looks like an NQ question file (question<TAB>answers); attach it to a corpus with "
                     "corpora.load_questions(...) or `genret inspect CORPUS --questions FILE`", path=p)
  first = _first_line(p)
  fields = [f.strip().lower() for f in first.split("\t")]
  if fields[:3] == ["id", "text", "title"]:
    return "dpr"
  if fields == ["query-id", "corpus-id", "score"]:
    raise InputError("this is a qrels file; pass the BEIR directory that holds qrels/", path=p)
  if len(fields) == 2 and fields[1].startswith("["):
    raise InputError("looks like an NQ question file (question<TAB>answers); attach it to a corpus with "
                     "corpora.load_questions(...) or `genret inspect CORPUS --questions FILE`", path=p)
  if first.lstrip().startswith("{"):
    return "jsonl"
  raise InputError("cannot tell the format (expected a BEIR directory, a DPR TSV with header "
                   "'id<TAB>text<TAB>title', or JSONL); pass format=... / --format", path=p)


def load(path_or_name: str, format: str | None = None, **kw) -> Collection:  # pylint: disable=redefined-builtin
  """Loads a collection.

  Args:
    path_or_name: a BEIR directory, a DPR passages TSV, a JSONL corpus (each optionally gzipped), the name
      "default" (the embedded corpus), or an ir_datasets name (`irds:beir/scifact` or a bare name when the
      package is installed; read offline only).
    format: one of FORMATS; detected from the path when None.
    **kw: `name` (collection name), `normalize` (apply the reference's body normalisation, default False),
      `max_docs` (keep the first N documents; the rest are counted in the report).
  """
  from genret_jax.corpora import beir, dpr, irds, jsonl
  if kw.get("max_docs") is not None:
    check_int(kw["max_docs"], "max_docs", 1)   # a negative cut otherwise reads as an empty corpus
  fmt = format or detect_format(path_or_name)
  p = str(path_or_name)
  if fmt == "beir":
    return beir.read_beir(p, **kw)
  if fmt == "dpr":
    return dpr.read_dpr_passages(p, **kw)
  if fmt == "jsonl":
    return jsonl.read_jsonl_corpus(p, **kw)
  if fmt == "ir_datasets":
    kw.pop("name", None)
    return irds.read_ir_dataset(p, **kw)
  if fmt == "default":
    from genret_jax.corpora import default
    return default.load_default(**kw)
  raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", key="format")


def load_questions(path: str, collection: Collection | None = None, *, split: str = "test",
                   id_prefix: str | None = None) -> list[Query] | Collection:
  """Reads an NQ DPR-style question file (`question<TAB>['answer', ...]`).

  Returns the queries, or, when `collection` is given, a new collection with them attached (ids
  `<id_prefix or split>-<row>`; answers set, no qrels).
  """
  from genret_jax.corpora import dpr
  queries = dpr.read_questions(path, split=split, id_prefix=id_prefix)
  if collection is None:
    return queries
  return dpr.attach_questions(collection, queries, source=str(path))


__all__ = ["Collection", "Document", "Query", "FORMATS", "detect_format", "load", "load_questions"]
