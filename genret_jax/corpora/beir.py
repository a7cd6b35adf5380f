"""BEIR directory reader: `corpus.jsonl[.gz]`, `queries.jsonl[.gz]`, `qrels/<split>.tsv[.gz]`.

A query's split is the name of the qrels file that judges it (`dev` is renamed `validation`, the seqio
convention); a query in no qrels file takes `metadata.split` when the queries file has it (SciFact), else
"test", and is kept and counted as unjudged. When a qrels file disagrees with `metadata.split`, the qrels file
wins and the disagreement is counted (`split_conflicts`). A query judged in several qrels files takes the
first of test, validation, train, then others alphabetically, counted as `queries_in_several_qrels_files`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from genret_jax.corpora import jsonl
from genret_jax.corpora.builder import CollectionBuilder
from genret_jax.corpora.lines import check_columns, iter_tsv_rows
from genret_jax.corpora.types import Collection, Query
from genret_jax.errors import InputError

SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
_SPLIT_PRIORITY = ("test", "validation", "train")
QRELS_HEADER = ["query-id", "corpus-id", "score"]
DEFAULT_SPLIT = "test"


def canonical_split(name: str) -> str:
  return SPLIT_ALIASES.get(name, name)


def find_file(directory: str, stem: str) -> str | None:
  found = [os.path.join(directory, stem + s) for s in ("", ".gz") if os.path.isfile(os.path.join(directory, stem + s))]
  if len(found) > 1:   # which one is meant cannot be known; one was read silently before
    raise InputError(f"both {stem} and {stem}.gz are present; remove one", path=directory)
  return found[0] if found else None


def is_beir_dir(path: str) -> bool:
  return os.path.isdir(path) and find_file(path, "corpus.jsonl") is not None


def qrels_files(directory: str) -> list[tuple[str, str]]:
  """(split, path) for each `qrels/<split>.tsv[.gz]`, in split-priority order."""
  qdir = os.path.join(directory, "qrels")
  if not os.path.isdir(qdir):
    return []
  found = []
  for entry in sorted(os.listdir(qdir)):
    for suffix in (".tsv", ".tsv.gz"):
      if entry.endswith(suffix):
        found.append((canonical_split(entry[: -len(suffix)]), os.path.join(qdir, entry)))
  rank = {s: i for i, s in enumerate(_SPLIT_PRIORITY)}
  return sorted(found, key=lambda sp: (rank.get(sp[0], len(rank)), sp[0], sp[1]))


def parse_grade(value: str, path: str, line: int) -> int:
  try:
    return int(value)
  except ValueError:
    pass
  try:
    grade = float(value)
  except ValueError:
    grade = None
  if grade is None or not grade.is_integer():
    raise InputError(f"relevance score must be an integer, found {value!r}", path=path, line=line)
  return int(grade)


def read_qrels_file(path: str, builder: CollectionBuilder) -> list[str]:
  """Adds the judgments of one qrels TSV to `builder`; returns the query ids it judges, in order."""
  judged: dict[str, None] = {}
  for lineno, row in iter_tsv_rows(path, quoting=False):
    row = [field.strip() for field in row]
    if lineno == 1 and row == QRELS_HEADER:
      continue
    check_columns(row, 3, "query-id, corpus-id, score", path, lineno)
    if lineno == 1:
      try:
        parse_grade(row[2], path, lineno)
      except InputError:
        raise InputError(f"unexpected qrels header {row!r}; expected {QRELS_HEADER!r}", path=path,
                         line=lineno) from None
    builder.add_qrel(row[0], row[1], parse_grade(row[2], path, lineno), path, lineno)
    judged.setdefault(row[0], None)
  return list(judged)


def read_beir(directory: str, *, name: str | None = None, normalize: bool = False,
              max_docs: int | None = None) -> Collection:
  """Reads a BEIR-layout directory into a `Collection` (see the module docstring for split rules).

  `max_docs` keeps the first documents only; judgments of dropped documents are then counted
  (`qrels_beyond_max_docs`) instead of being errors, since they name real documents.
  """
  directory = str(directory)
  corpus_path = find_file(directory, "corpus.jsonl")
  if corpus_path is None:
    raise InputError("not a BEIR directory: no corpus.jsonl or corpus.jsonl.gz", path=directory)
  builder = CollectionBuilder(name or os.path.basename(os.path.normpath(directory)),
                              source=os.path.abspath(directory))
  jsonl.read_documents(corpus_path, builder, normalize=normalize, max_docs=max_docs)
  if not builder.documents:
    raise InputError("empty corpus: no documents found", path=corpus_path)

  metadata_split: dict[str, str] = {}
  queries_path = find_file(directory, "queries.jsonl")
  if queries_path is not None:
    for lineno, record in jsonl.iter_json_records(queries_path, builder):
      qid = jsonl.get_id(record, ("_id", "id"), queries_path, lineno)
      text = jsonl.get_text(record, "text", queries_path, lineno, required=True)
      meta = record.get("metadata")
      if isinstance(meta, dict) and isinstance(meta.get("split"), str) and meta["split"]:
        metadata_split[qid] = canonical_split(meta["split"])
      builder.add_query(Query(query_id=qid, text=text, split=""), queries_path, lineno)

  qrels_split: dict[str, str] = {}
  if max_docs is not None:
    builder.unknown_doc_qrels_key = "qrels_beyond_max_docs"
  qdir = os.path.join(directory, "qrels")
  if os.path.isdir(qdir):
    used = {os.path.basename(p) for _, p in qrels_files(directory)}
    ignored = [e for e in sorted(os.listdir(qdir)) if e not in used and not e.startswith(".")]
    if ignored:   # e.g. qrels/test.txt: named so the reader does not take it for judgments
      builder.count("qrels_files_ignored", len(ignored))
      logging.warning("%s: ignored (not <split>.tsv[.gz]): %s", qdir, ", ".join(ignored))
  for split, path in qrels_files(directory):
    for qid in read_qrels_file(path, builder):
      if qid in qrels_split and qrels_split[qid] != split:
        builder.count("queries_in_several_qrels_files")
        continue
      qrels_split.setdefault(qid, split)

  queries = []
  for q in builder.queries:
    split = qrels_split.get(q.query_id) or metadata_split.get(q.query_id) or DEFAULT_SPLIT
    if q.query_id in qrels_split and q.query_id in metadata_split and metadata_split[q.query_id] != split:
      builder.count("split_conflicts")
    queries.append(dataclasses.replace(q, split=split))
  builder.queries = queries
  return builder.build(empty_corpus_path=corpus_path)

