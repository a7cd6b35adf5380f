"""Builds the embedded default corpus: Python standard-library docstrings as a known-item retrieval task.

Documents are public functions, classes and methods of a fixed list of pure-Python standard-library modules:
title = qualified name (`json.dumps`), text = the docstring body after its summary paragraph (whitespace
collapsed, cut to `--max_words` words). The query of each document is its summary paragraph, which is removed
from the text, so a query never appears verbatim in its own document; one qrel (grade 1) per query. Documents
whose summary or body duplicates another's are dropped (counted in meta.json), so every query has exactly one
right answer. Splits are a seeded shuffle of the documents.

Docstrings change between Python releases, so the corpus is generated ONCE and shipped as a snapshot
(`genret_jax/data/pydoc_known_item/`, BEIR layout plus meta.json) that `default.load_default()` reads.
Run as a module (the package's `inspect.py` would shadow the standard library's if run as a script):

  python -m genret_jax.corpora.make_default_corpus --out genret_jax/data/pydoc_known_item
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib
import inspect
import io
import json
import os
import platform
import random
import re
import sys
import types
import warnings
from typing import Any, Iterator

if getattr(inspect, "getdoc", None) is None:  # run as a script from this folder: our inspect.py shadows stdlib
  raise SystemExit("run as `python -m genret_jax.corpora.make_default_corpus`")

# Pure-Python modules that import without side effects on every platform; C modules have signature-only
# docstrings. Fixed and sorted so the candidate set depends only on the Python release.
MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.runners", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "asyncio.timeouts",
    "asyncio.transports", "base64", "bdb", "bz2", "cProfile", "calendar", "cmd", "code", "codecs", "codeop",
    "collections", "compileall", "concurrent.futures.process", "concurrent.futures.thread", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses", "dbm", "dbm.dumb", "difflib", "dis",
    "doctest", "email.charset", "email.feedparser", "email.generator", "email.header", "email.headerregistry",
    "email.message", "email.parser", "email.policy", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "importlib.abc", "importlib.metadata", "importlib.resources.abc", "importlib.util", "inspect",
    "ipaddress", "json", "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "mimetypes", "modulefinder",
    "multiprocessing.connection", "multiprocessing.context", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.queues", "multiprocessing.shared_memory", "multiprocessing.synchronize", "netrc", "ntpath",
    "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile", "pydoc", "queue", "quopri", "random",
    "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "site", "smtplib", "socket", "socketserver", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token",
    "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unittest.case",
    "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom.expatbuilder", "xml.dom.minidom", "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler",
    "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport",
    "zoneinfo",
)

_WS = re.compile(r"\s+")


def _split_docstring(doc: str) -> tuple[str, str]:
  """(summary paragraph, body) of a docstring, both with whitespace collapsed."""
  lines = inspect.cleandoc(doc).splitlines()
  summary: list[str] = []
  i = 0
  while i < len(lines) and lines[i].strip():
    summary.append(lines[i])
    i += 1
  body = "\n".join(lines[i:])
  return _WS.sub(" ", " ".join(summary)).strip(), _WS.sub(" ", body).strip()


def _members(module: types.ModuleType) -> Iterator[tuple[str, Any]]:
  """(qualified name, object) of public functions/classes defined in `module`, and their own methods."""
  for name in sorted(vars(module)):
    obj = vars(module)[name]
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(obj):
      yield f"{module.__name__}.{name}", obj
    elif inspect.isclass(obj):
      yield f"{module.__name__}.{name}", obj
      for attr in sorted(vars(obj)):
        member = vars(obj)[attr]
        if isinstance(member, (staticmethod, classmethod)):
          member = member.__func__
        if not attr.startswith("_") and inspect.isfunction(member):
          yield f"{module.__name__}.{name}.{attr}", member


def collect(min_summary_words: int, max_summary_words: int, min_body_words: int, max_words: int
            ) -> tuple[list[dict[str, str]], dict[str, int]]:
  """Candidate (title, text, query) records in a fixed order, plus counts of what was filtered out."""
  counts: collections.Counter[str] = collections.Counter()
  records: list[dict[str, str]] = []
  seen_objects: set[int] = set()
  for module_name in MODULES:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    except ImportError:
      counts["modules_unavailable"] += 1
      continue
    for qualname, obj in _members(module):
      if id(obj) in seen_objects:
        counts["aliases"] += 1
        continue
      seen_objects.add(id(obj))
      with warnings.catch_warnings():  # typing.io / typing.re warn on attribute access
        warnings.simplefilter("ignore")
        doc = obj.__doc__
      if not isinstance(doc, str) or not doc.strip():
        counts["no_docstring"] += 1
        continue
      summary, body = _split_docstring(doc)
      n_summary, body_words = len(summary.split()), body.split()
      if not min_summary_words <= n_summary <= max_summary_words:
        counts["summary_length_out_of_range"] += 1
        continue
      if len(body_words) < min_body_words:
        counts["body_too_short"] += 1
        continue
      if len(body_words) > max_words:
        counts["bodies_truncated"] += 1
      records.append({"title": qualname, "text": " ".join(body_words[:max_words]), "query": summary})
  # Known-item: a query or body shared by two documents would have two right answers, so drop all copies.
  by_query = collections.Counter(r["query"].lower() for r in records)
  by_text = collections.Counter(r["text"].lower() for r in records)
  kept = []
  for r in records:
    if by_query[r["query"].lower()] > 1:
      counts["duplicate_summary"] += 1
    elif by_text[r["text"].lower()] > 1:
      counts["duplicate_body"] += 1
    else:
      kept.append(r)
  return kept, dict(sorted(counts.items()))


def _write_gzip_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
  buf = io.BytesIO()
  # mtime=0 and no file name in the header: the snapshot's bytes depend only on its content.
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
    for row in rows:
      f.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
  with open(path, "wb") as out:
    out.write(buf.getvalue())


def build(out_dir: str, *, seed: int, num_docs: int, fractions: tuple[float, float, float],
          min_summary_words: int, max_summary_words: int, min_body_words: int, max_words: int) -> dict[str, Any]:
  records, counts = collect(min_summary_words, max_summary_words, min_body_words, max_words)
  rng = random.Random(seed)
  if len(records) > num_docs:
    counts["not_sampled"] = len(records) - num_docs
    chosen = sorted(rng.sample(range(len(records)), num_docs))
    records = [records[i] for i in chosen]
  order = list(range(len(records)))
  rng.shuffle(order)
  n_train = round(fractions[0] * len(records))
  n_val = round(fractions[1] * len(records))
  split_of = {}
  for rank, i in enumerate(order):
    split_of[i] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"

  os.makedirs(os.path.join(out_dir, "qrels"), exist_ok=True)
  corpus = [{"_id": str(i), "title": r["title"], "text": r["text"]} for i, r in enumerate(records)]
  queries = [{"_id": f"q{i}", "text": r["query"], "metadata": {"split": split_of[i]}}
             for i, r in enumerate(records)]
  _write_gzip_jsonl(os.path.join(out_dir, "corpus.jsonl.gz"), corpus)
  _write_gzip_jsonl(os.path.join(out_dir, "queries.jsonl.gz"), queries)
  for split in ("train", "validation", "test"):
    with open(os.path.join(out_dir, "qrels", f"{split}.tsv"), "w", encoding="utf-8", newline="\n") as f:
      f.write("query-id\tcorpus-id\tscore\n")
      for i in range(len(records)):
        if split_of[i] == split:
          f.write(f"q{i}\t{i}\t1\n")
  meta = {
      "name": "pydoc_known_item",
      "description": "Python standard-library docstrings as a known-item retrieval task: document = docstring "
                     "body (title = qualified name), query = the docstring's summary paragraph (removed from "
                     "the document), one relevant document per query.",
      "licence": "Python Software Foundation License (the docstrings are part of CPython)",
      "generator": "python -m genret_jax.corpora.make_default_corpus",
      "python_version": platform.python_version(),
      "seed": seed,
      "num_docs": len(records),
      "splits": {s: sum(1 for v in split_of.values() if v == s) for s in ("train", "validation", "test")},
      "filters": {"min_summary_words": min_summary_words, "max_summary_words": max_summary_words,
                  "min_body_words": min_body_words, "max_words": max_words},
      "dropped": counts,
      "modules": list(MODULES),
  }
  with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write("\n")
  return meta


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "data", "pydoc_known_item"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_docs", type=int, default=1500)
  parser.add_argument("--train", type=float, default=0.8)
  parser.add_argument("--validation", type=float, default=0.1)
  parser.add_argument("--min_summary_words", type=int, default=4)
  parser.add_argument("--max_summary_words", type=int, default=40)
  parser.add_argument("--min_body_words", type=int, default=8)
  parser.add_argument("--max_words", type=int, default=80)
  args = parser.parse_args(argv)
  meta = build(args.out, seed=args.seed, num_docs=args.num_docs,
               fractions=(args.train, args.validation, 1.0 - args.train - args.validation),
               min_summary_words=args.min_summary_words, max_summary_words=args.max_summary_words,
               min_body_words=args.min_body_words, max_words=args.max_words)
  print(json.dumps({k: meta[k] for k in ("num_docs", "splits", "dropped", "python_version")}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
