"""`ir_datasets` dataset names (optional extra `genret-jax[ir_datasets]`), read strictly offline.

Only datasets whose files are already in the ir_datasets cache (`IR_DATASETS_HOME`, default
`~/.ir_datasets`) can be read: downloads are blocked for the duration of the read and turned into an
InputError that says how to fetch the files first. Query splits follow the dataset name's last component
(`beir/scifact/test` -> "test", `dev` -> "validation"); other names use "test".
"""

from __future__ import annotations

import contextlib
import importlib

from genret_jax.corpora.beir import canonical_split
from genret_jax.corpora.builder import CollectionBuilder
from genret_jax.corpora.normalize import normalize_document
from genret_jax.corpora.types import Collection, Document, Query
from genret_jax.errors import InputError

PREFIX = "irds:"
_KNOWN_SPLITS = ("train", "dev", "validation", "valid", "test")


class _DownloadBlocked(Exception):
  pass


def available() -> bool:
  try:
    importlib.import_module("ir_datasets")
  except ImportError:
    return False
  return True


@contextlib.contextmanager
def _no_downloads():
  """Makes every network source of ir_datasets raise instead of downloading."""
  try:
    download = importlib.import_module("ir_datasets.util.download")
  except ImportError:
    download = None
  cls = getattr(download, "RequestsDownload", None)
  if cls is None:  # unknown ir_datasets layout: refuse rather than risk a download
    raise InputError("this ir_datasets version cannot be read offline safely (no util.download.RequestsDownload)",
                     key="ir_datasets")

  def blocked(self, *args, **kwargs):
    raise _DownloadBlocked(getattr(self, "url", "?"))

  saved = {name: cls.__dict__[name] for name in ("stream", "__iter__") if name in cls.__dict__}
  for name in saved:
    setattr(cls, name, blocked)
  try:
    yield
  finally:
    for name, fn in saved.items():
      setattr(cls, name, fn)


def _contains_blocked(value) -> bool:
  if isinstance(value, _DownloadBlocked):
    return True
  if isinstance(value, (list, tuple)):
    return any(_contains_blocked(v) for v in value)
  return False


def _text(obj, *names: str) -> str:
  for name in names:
    value = getattr(obj, name, None)
    if isinstance(value, str):
      return value
  return ""


def read_ir_dataset(name: str, *, normalize: bool = False, max_docs: int | None = None) -> Collection:
  """Reads an ir_datasets dataset (docs, and queries/qrels when it has them) from the local cache only."""
  dataset_name = name[len(PREFIX):] if name.startswith(PREFIX) else name
  if not available():
    raise InputError(f"{dataset_name!r} looks like an ir_datasets name, but the ir_datasets package is not "
                     "installed (pip install 'genret-jax[ir_datasets]'), and no such file or directory exists",
                     path=name)
  ir_datasets = importlib.import_module("ir_datasets")
  try:
    dataset = ir_datasets.load(dataset_name)
  except KeyError:
    raise InputError(f"unknown ir_datasets name {dataset_name!r} (and no such file or directory)",
                     path=name) from None
  if not dataset.has_docs():
    raise InputError(f"ir_datasets {dataset_name!r} has no documents; name the corpus-level dataset", path=name)
  last = dataset_name.rsplit("/", 1)[-1]
  split = canonical_split(last) if last in _KNOWN_SPLITS else "test"
  builder = CollectionBuilder(dataset_name.replace("/", "_"), source=f"{PREFIX}{dataset_name}")
  if max_docs is not None:
    builder.unknown_doc_qrels_key = "qrels_beyond_max_docs"
  where = f"{PREFIX}{dataset_name}"
  try:
    with _no_downloads():
      for i, d in enumerate(dataset.docs_iter()):
        if max_docs is not None and i >= max_docs:
          builder.count("documents_beyond_max_docs")
          continue
        doc = Document(doc_id=str(d.doc_id), title=_text(d, "title"), text=_text(d, "text", "body", "passage"))
        builder.add_document(normalize_document(doc) if normalize else doc, where + ":docs", i + 1)
      if dataset.has_queries():
        for i, q in enumerate(dataset.queries_iter()):
          builder.add_query(Query(query_id=str(q.query_id), text=_text(q, "text", "title", "query"), split=split),
                            where + ":queries", i + 1)
      if dataset.has_qrels():
        for i, r in enumerate(dataset.qrels_iter()):
          builder.add_qrel(str(r.query_id), str(r.doc_id), int(r.relevance), where + ":qrels", i + 1)
  except (_DownloadBlocked, FileNotFoundError, RuntimeError) as e:
    # With several mirrors ir_datasets wraps our _DownloadBlocked in RuntimeError('All download sources failed').
    if isinstance(e, RuntimeError) and not _contains_blocked(e.args):
      raise
    raise InputError(f"files of ir_datasets {dataset_name!r} are not in the local cache "
                     f"({type(e).__name__}: {e}); fetch them first, e.g. `ir_datasets export {dataset_name} docs > /dev/null`", path=name) from None
  return builder.build(empty_corpus_path=where)
