"""DPR-style TSV files: the passage corpus (`psgs_w100.tsv`) and NQ question files (`nq-test.qa.csv`).

Passages: one header line `id \\t text \\t title`, then one passage per row. Rows are parsed like DPR's own
`csv.reader(f, delimiter="\\t")`, because psgs_w100 quotes its text field and doubles inner quotes.
Questions: `question \\t ['answer', ...]` rows, the answer list a Python literal, no header and no ids (ids are
`<split>-<row index>`); such queries carry answers and no qrels (the NQ evaluation matches answer strings).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
from typing import Iterator

from genret_jax.corpora.builder import CollectionBuilder
from genret_jax.corpora.lines import PathLike, check_columns, iter_tsv_rows
from genret_jax.corpora.normalize import normalize_document
from genret_jax.corpora.types import Collection, Document, Query
from genret_jax.errors import InputError

PASSAGES_HEADER = ["id", "text", "title"]
QUESTIONS_HEADER = ["question", "answers"]


def iter_passages(path: PathLike) -> Iterator[tuple[int, Document]]:
  """Streams (line_number, Document) from a DPR passages TSV without holding the corpus in memory."""
  path_s = str(path)
  first = True
  for lineno, row in iter_tsv_rows(path_s):
    if first:
      first = False
      if [f.strip().lower() for f in row] == PASSAGES_HEADER:
        continue
      raise InputError(f"expected the DPR header 'id<TAB>text<TAB>title', found {row[:3]!r}", path=path_s,
                       line=lineno)
    check_columns(row, 3, "id, text, title", path_s, lineno)
    yield lineno, Document(doc_id=row[0].strip(), title=row[2], text=row[1])


def read_dpr_passages(path: PathLike, *, name: str | None = None, normalize: bool = False,
                      max_docs: int | None = None) -> Collection:
  """A corpus-only collection from a DPR passages TSV(.gz); `max_docs` keeps the first passages."""
  path_s = str(path)
  builder = CollectionBuilder(name or _stem(path_s), source=os.path.abspath(path_s))
  for lineno, doc in iter_passages(path_s):
    if max_docs is not None and len(builder.documents) >= max_docs:
      builder.count("documents_beyond_max_docs")
      continue
    if "\n" in doc.text or "\n" in doc.title:
      # csv's quoting (the reference's reader too) lets a quoted field run over lines: an unbalanced quote
      # swallows the passages after it into this one. Counted, and the first one named.
      if not builder.report["passages_over_several_lines"]:
        logging.warning("%s:%d: a quoted field runs over several lines (an unbalanced quote?)", path_s, lineno)
      builder.count("passages_over_several_lines")
    builder.add_document(normalize_document(doc) if normalize else doc, path_s, lineno)
  return builder.build(empty_corpus_path=path_s)


def parse_answers(value: str, path: str, line: int) -> tuple[str, ...]:
  try:
    answers = ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    raise InputError(f"answers must be a Python list literal like ['a', 'b'], found {value[:60]!r}",
                     path=path, line=line) from None
  if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
    raise InputError(f"answers must be a list of strings, found {value[:60]!r}", path=path, line=line)
  return tuple(answers)


def read_questions(path: PathLike, *, split: str = "test", id_prefix: str | None = None) -> list[Query]:
  """Queries with answers from an NQ DPR-style question file; ids are `<id_prefix or split>-<row index>`."""
  path_s = str(path)
  prefix = id_prefix if id_prefix is not None else split
  queries: list[Query] = []
  for lineno, row in iter_tsv_rows(path_s):
    if not queries and lineno == 1 and [f.strip().lower() for f in row] == QUESTIONS_HEADER:
      continue
    check_columns(row, 2, "question, answers", path_s, lineno)
    question = row[0].strip()
    if not question:
      raise InputError("empty question", path=path_s, line=lineno)
    queries.append(Query(query_id=f"{prefix}-{len(queries)}", text=question, split=split,
                         answers=parse_answers(row[1], path_s, lineno)))
  if not queries:
    raise InputError("no questions found", path=path_s)
  return queries


def attach_questions(collection: Collection, queries: list[Query], source: str) -> Collection:
  """A new collection with `queries` appended (ids must not clash); documents and qrels are shared."""
  known = {q.query_id for q in collection.queries}
  for q in queries:
    if q.query_id in known:
      raise InputError(f"question id {q.query_id!r} already names a query of {collection.name!r}; "
                       "pass a different id_prefix", path=source)
  merged = list(collection.queries) + list(queries)
  report = dict(collection.report)
  report["unjudged_queries"] = sum(1 for q in merged if not collection.qrels.get(q.query_id))
  report["queries_with_answers"] = sum(1 for q in merged if q.answers)
  return dataclasses.replace(collection, queries=merged, report=report)


def _stem(path: str) -> str:
  base = os.path.basename(path)
  for suffix in (".gz", ".tsv", ".csv"):
    if base.endswith(suffix):
      base = base[: -len(suffix)]
  return base or "passages"
