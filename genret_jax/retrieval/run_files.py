"""Retrieval outputs: TREC run files, per-query JSONL results, metrics JSON, and resumable batch processing.

A retrieval job writes into one output directory:

* `results.jsonl` -- append-only, one line per query: `{"batch", "pos", "of", "query_id", "doc_ids", "scores",
  ...extra}`. A query batch is appended with one write followed by fsync, and a batch counts as done only when
  all `of` of its lines are present, so a job killed at any moment leaves at most a partial last batch, which the
  next start cuts off and recomputes.
* `meta.json` -- what produced the results (checkpoint, configuration, ...). A restart with different meta is
  refused rather than mixing two configurations in one file.
* `run.trec` and `metrics.json` -- derived from `results.jsonl` at the end, each written to a temporary file and
  renamed into place, so readers never see half a file.

On an object store (gs://, `filesystem.is_remote`), which cannot append to or truncate an object, each batch is
written whole as its own object, `results.parts/batch-<b>.jsonl` (an object appears only when its upload ends, so
a part is never half there), and `consolidate` merges the parts into one `results.jsonl` at the end of the job and
removes them. A job killed between the merge and the removal leaves parts that `results.jsonl` already holds: the
next start checks that they hold the same queries and counts them as merged. The directory's contents after a job
are the same either way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from genret_jax import atomic_files, filesystem
from genret_jax.errors import InputError

RESULTS_FILE = "results.jsonl"
META_FILE = "meta.json"
RUN_FILE = "run.trec"
METRICS_FILE = "metrics.json"
PARTS_DIR = "results.parts"   # object stores only: one object per batch until `consolidate`
_PART = re.compile(r"^batch-(\d+)\.jsonl$")
_RESERVED = ("batch", "pos", "of", "query_id", "doc_ids", "scores")


@dataclasses.dataclass
class QueryResult:
  """One query's ranked documents, plus anything else worth keeping (identifiers, keys, stats)."""

  query_id: str
  doc_ids: list[str]
  scores: list[float]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _write_json(path: str, obj: Any) -> None:
  atomic_files.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _check_docid(docid: str, qid: str) -> None:
  if not docid or any(c.isspace() for c in docid):
    raise InputError(f"query {qid}: document id {docid!r} is empty or has whitespace; TREC run files cannot "
                     "hold it", key="doc_ids")


def format_trec_run(run: Mapping[str, Sequence[tuple[str, float]]], tag: str = "genret") -> str:
  """TREC run lines `qid Q0 docid rank score tag`, rank 1-based in the given order."""
  if not tag or any(c.isspace() for c in tag):
    raise InputError(f"run tag {tag!r} must be non-empty without whitespace", key="tag")
  lines = []
  for qid, ranked in run.items():
    _check_docid(str(qid), str(qid))
    for rank, (docid, score) in enumerate(ranked, start=1):
      _check_docid(docid, qid)
      lines.append(f"{qid} Q0 {docid} {rank} {float(score):.6g} {tag}\n")
  return "".join(lines)


def write_trec_run(path: str, run: Mapping[str, Sequence[tuple[str, float]]], tag: str = "genret") -> None:
  atomic_files.write_text(path, format_trec_run(run, tag))


def read_trec_run(path: str) -> dict[str, list[tuple[str, float]]]:
  """Reads a TREC run file into query id -> [(docid, score)] in rank order."""
  rows: dict[str, list[tuple[int, str, float]]] = {}
  if not filesystem.exists(path):
    raise InputError("cannot read run file: no such file", path=path)
  f = filesystem.open(path, encoding="utf-8")
  with f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 6:
        raise InputError(f"expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}", path=path,
                         line=lineno)
      qid, _, docid, rank, score, _ = parts
      try:
        rows.setdefault(qid, []).append((int(rank), docid, float(score)))
      except ValueError as e:
        raise InputError(f"bad rank or score: {e}", path=path, line=lineno) from e
  return {q: [(d, s) for _, d, s in sorted(r, key=lambda x: x[0])] for q, r in rows.items()}


class ResultsStore:
  """The output directory of one retrieval job; see the module docstring for the layout."""

  def __init__(self, out_dir: str, meta: Mapping[str, Any] | None = None, overwrite: bool = False):
    """Opens (creating or resuming) an output directory.

    Args:
      out_dir: the directory (local, or a URL such as gs://bucket/run).
      meta: JSON-serialisable description of the job; must equal the stored one when resuming.
      overwrite: start from scratch, deleting earlier results in `out_dir`.
    """
    self.out_dir = filesystem.abspath(out_dir)
    self.remote = filesystem.is_remote(self.out_dir)
    self.results_path = os.path.join(self.out_dir, RESULTS_FILE)
    self.parts_dir = os.path.join(self.out_dir, PARTS_DIR)
    self.meta = json.loads(json.dumps(dict(meta or {}), sort_keys=True))
    if overwrite:
      for name in (RESULTS_FILE, META_FILE, RUN_FILE, METRICS_FILE, PARTS_DIR):
        p = os.path.join(self.out_dir, name)
        if filesystem.isdir(p):
          filesystem.rmtree(p)
        elif filesystem.exists(p):
          filesystem.remove(p)
    filesystem.makedirs(self.out_dir)
    meta_path = os.path.join(self.out_dir, META_FILE)
    if filesystem.exists(meta_path):
      try:
        with filesystem.open(meta_path) as f:
          stored = json.load(f)
      except ValueError as e:
        raise InputError(f"unreadable job description ({e}); delete the directory or start over with "
                         "overwrite=True", path=meta_path) from e
      if stored != self.meta:
        changed = sorted(k for k in set(stored) | set(self.meta) if stored.get(k) != self.meta.get(k))
        raise InputError(f"holds results of a different job (differs in {changed}); pass a new output "
                         "directory or overwrite=True (genret retrieve: --gin.genret.retrieve_run.overwrite=True)",
                         path=self.out_dir)
    else:
      _write_json(meta_path, self.meta)
    self.report = dict(partial_lines_dropped=0)
    self._completed: dict[int, int] = {}  # batch -> number of queries
    self._query_ids: dict[int, list[str]] = {}  # batch -> its query ids, in order
    self._parts: dict[int, str] = {}  # batch -> its part object, not yet in results.jsonl (object stores)
    self._merged_parts: list[str] = []  # parts results.jsonl already holds (a merge interrupted before cleanup)
    self._recover()
    self._recover_parts()

  def _recover(self) -> None:
    """Finds the complete batches and cuts off a partial last batch left by an interrupted job."""
    if not filesystem.exists(self.results_path):
      return
    with filesystem.open(self.results_path, "rb") as f:
      data = f.read()
    good_end = offset = 0
    group: list[dict] = []
    # Every complete line must parse: an interrupted append leaves only an unterminated fragment at the end.
    for lineno, raw in enumerate(data.split(b"\n")[:-1], start=1):
      offset += len(raw) + 1
      try:
        rec = json.loads(raw)
        batch, pos, of = int(rec["batch"]), int(rec["pos"]), int(rec["of"])
      except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"unreadable result line ({e}); the file is corrupt", path=self.results_path,
                         line=lineno) from e
      if pos != len(group) or (group and (batch != group[0]["batch"] or of != group[0]["of"])):
        break  # an interrupted batch: it and everything after it are redone
      if batch in self._completed:
        raise InputError(f"batch {batch} appears twice", path=self.results_path, line=lineno)
      group.append(rec)
      if len(group) == of:
        self._completed[batch] = of
        self._query_ids[batch] = [str(r.get("query_id")) for r in group]
        good_end = offset
        group = []
    if good_end < len(data):
      if self.remote:   # written whole by `consolidate`: a partial batch here is not ours to cut off
        raise InputError(f"ends in an incomplete batch after byte {good_end}; the file is corrupt (it is written "
                         "whole on object stores)", path=self.results_path)
      self.report["partial_lines_dropped"] = data[good_end:].count(b"\n") + (0 if data.endswith(b"\n") else 1)
      with open(self.results_path, "r+b") as f:
        f.truncate(good_end)

  def _recover_parts(self) -> None:
    """Adds the batches written as part objects (object stores; a local directory never has any)."""
    if not filesystem.isdir(self.parts_dir):
      return
    names = sorted(filesystem.listdir(self.parts_dir))
    for name in names:
      if not _PART.match(name):
        raise InputError(f"unexpected entry {name!r}: only batch-<n>.jsonl parts belong here", path=self.parts_dir)
    paths = [os.path.join(self.parts_dir, name) for name in names]
    for name, path, recs in zip(names, paths, _read_parts(paths)):
      batch = int(_PART.match(name).group(1))
      ids = [str(r.get("query_id")) for r in recs]
      if any(int(r["batch"]) != batch for r in recs):
        raise InputError(f"holds rows of another batch than {batch}", path=path)
      if batch in self._completed:
        if self._query_ids[batch] != ids:
          raise InputError(f"batch {batch} differs from the one {RESULTS_FILE} holds", path=path)
        self._merged_parts.append(path)
        continue
      self._completed[batch] = len(recs)
      self._query_ids[batch] = ids
      self._parts[batch] = path

  @property
  def completed_batches(self) -> set[int]:
    return set(self._completed)

  @property
  def num_queries(self) -> int:
    return sum(self._completed.values())

  def write_batch(self, batch: int, results: Sequence[QueryResult]) -> None:
    """Stores one batch's results durably: appended (one write, flush, fsync), or on an object store uploaded
    whole as its own part."""
    if batch in self._completed:
      raise InputError(f"batch {batch} is already written", path=self.results_path)
    if not results:
      raise InputError(f"batch {batch} has no queries", path=self.results_path)
    lines = []
    for pos, r in enumerate(results):
      if len(r.doc_ids) != len(r.scores):
        raise InputError(f"query {r.query_id}: {len(r.doc_ids)} documents but {len(r.scores)} scores",
                         key="results")
      clash = set(r.extra) & set(_RESERVED)
      if clash:
        raise InputError(f"extra fields {sorted(clash)} clash with the result fields", key="results")
      rec = dict(batch=int(batch), pos=pos, of=len(results), query_id=str(r.query_id),
                 doc_ids=[str(d) for d in r.doc_ids], scores=[float(s) for s in r.scores], **r.extra)
      lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    if self.remote:
      path = os.path.join(self.parts_dir, f"batch-{int(batch):08d}.jsonl")
      atomic_files.write_text(path, "".join(lines))
      self._parts[int(batch)] = path
    else:
      with open(self.results_path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    self._completed[int(batch)] = len(results)
    self._query_ids[int(batch)] = [str(r.query_id) for r in results]

  def check_queries(self, batches: Sequence[Sequence[str]]) -> None:
    """Refuses to resume when a written batch holds other queries than `batches[b]` (the job's query ids per
    batch): meta.json counts the queries but does not list them, and a resumed job whose split changed kept the
    old queries' rows, then scored the new queries as if they had retrieved nothing."""
    for b in sorted(self._completed):
      want = list(batches[b]) if b < len(batches) else []
      if self._query_ids[b] != want:
        raise InputError(f"batch {b} holds queries {self._query_ids[b][:3]}..., the job now puts {want[:3]}... "
                         "there (the split's queries changed); pass a new output directory or overwrite=True "
                         "(genret retrieve: --gin.genret.retrieve_run.overwrite=True)", path=self.results_path)

  def _records(self) -> list[dict]:
    recs = []
    if filesystem.exists(self.results_path):
      with filesystem.open(self.results_path) as f:
        recs.extend(json.loads(line) for line in f)
    for part in _read_parts(list(self._parts.values())):
      recs.extend(part)
    recs.sort(key=lambda r: (r["batch"], r["pos"]))
    return recs

  def results(self) -> list[QueryResult]:
    """All stored results, in batch order."""
    return [QueryResult(r["query_id"], r["doc_ids"], r["scores"], {k: v for k, v in r.items() if k not in _RESERVED})
            for r in self._records()]

  def consolidate(self) -> None:
    """Object stores: merges the part objects into one `results.jsonl` (written whole) and removes them, so that
    a finished job's directory looks as a local one does. Nothing to do locally or when there are no parts."""
    if not self._parts and not self._merged_parts:
      return
    if self._parts:
      atomic_files.write_text(self.results_path,
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._records()))
    for path in list(self._parts.values()) + self._merged_parts:
      filesystem.remove(path)
    self.report["parts_merged"] = len(self._parts)
    self._parts, self._merged_parts = {}, []
    filesystem.rmtree(self.parts_dir, ignore_errors=True)

  def write_run(self, tag: str = "genret") -> str:
    """Writes `run.trec` from the stored results; returns its path."""
    run: dict[str, list[tuple[str, float]]] = {}
    for r in self.results():
      if r.query_id in run:
        raise InputError(f"query {r.query_id} has two results", path=self.results_path)
      run[r.query_id] = list(zip(r.doc_ids, r.scores))
    path = os.path.join(self.out_dir, RUN_FILE)
    write_trec_run(path, run, tag)
    return path

  def write_metrics(self, metrics: Mapping[str, Any]) -> str:
    path = os.path.join(self.out_dir, METRICS_FILE)
    _write_json(path, dict(metrics))
    return path


def _read_part(path: str) -> list[dict]:
  with filesystem.open(path) as f:
    lines = f.read().split("\n")
  recs = []
  for lineno, raw in enumerate(lines[:-1], start=1):
    try:
      rec = json.loads(raw)
      pos, of, _ = int(rec["pos"]), int(rec["of"]), int(rec["batch"])
    except (ValueError, KeyError, TypeError) as e:
      raise InputError(f"unreadable result line ({e}); the part is corrupt", path=path, line=lineno) from e
    if pos != len(recs) or of != len(lines) - 1:
      raise InputError(f"row {pos} of {of} at line {lineno}; the part is corrupt", path=path, line=lineno)
    recs.append(rec)
  if lines[-1] or not recs:
    raise InputError("incomplete part; the part is corrupt", path=path)
  return recs


def _read_parts(paths: Sequence[str]) -> list[list[dict]]:
  """Every part's rows, in order. An object store answers each read after tens of milliseconds, so a resumed or
  finished job of thousands of batches reads them 16 at a time."""
  if len(paths) < 2:
    return [_read_part(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
    return list(pool.map(_read_part, paths))


def process_batches(store: ResultsStore, batches: Iterable[int],
                    compute: Callable[[int], Sequence[QueryResult]], progress: bool = True,
                    desc: str = "retrieve") -> dict[str, int]:
  """Computes and stores every batch not already in `store`, in order.

  Args:
    store: the output directory.
    batches: all batch indices of the job.
    compute: batch index -> that batch's results.
    progress: show a tqdm progress bar.
    desc: progress-bar label.

  Returns:
    Counts of batches skipped (done before) and computed.
  """
  batches = list(batches)
  done = store.completed_batches
  todo = [b for b in batches if b not in done]
  counts = dict(batches_total=len(batches), batches_skipped=len(batches) - len(todo), batches_computed=0)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(batches), initial=counts["batches_skipped"], desc=desc, unit="batch")
  try:
    for b in todo:
      store.write_batch(b, compute(b))
      counts["batches_computed"] += 1
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  return counts
