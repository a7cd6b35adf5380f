"""The embedded default corpus: a deterministic, packaged known-item task over stdlib docstrings."""

from __future__ import annotations

import hashlib
import json
import os

from genret_jax import corpora
from genret_jax.corpora import default, stats


def _fingerprint(c: corpora.Collection) -> str:
  h = hashlib.sha256()
  for d in c.documents:
    h.update(json.dumps([d.doc_id, d.title, d.text]).encode())
  for q in c.queries:
    h.update(json.dumps([q.query_id, q.text, q.split]).encode())
  h.update(json.dumps(c.qrels, sort_keys=True).encode())
  return h.hexdigest()


def test_default_loads_and_matches_metadata():
  c = default.load_default()
  meta = default.metadata()
  assert len(c.documents) == meta["num_docs"]
  assert 1000 <= len(c.documents) <= 2000
  assert {s: len(c.queries_in(s)) for s in ("train", "validation", "test")} == meta["splits"]
  assert c.report["empty_documents"] == 0 and c.report["unjudged_queries"] == 0
  # Known item: one relevant document per query, each document the answer to exactly one query.
  assert all(len(c.qrels[q.query_id]) == 1 for q in c.queries)
  assert sorted(d for j in c.qrels.values() for d in j) == sorted(d.doc_id for d in c.documents)
  for q in c.queries:
    (doc_id,) = c.positives(q.query_id)
    doc = c.documents[c.doc_index(doc_id)]
    assert doc.title.count(".") >= 1  # a qualified name like json.dumps
    assert q.text not in doc.text  # the summary line was removed from the document


def test_default_is_deterministic_and_loadable_by_name():
  a, b = default.load_default(), corpora.load("default")
  assert _fingerprint(a) == _fingerprint(b)
  assert b.name == default.NAME


def test_default_snapshot_is_small_and_packaged():
  total = sum(os.path.getsize(os.path.join(root, f))
              for root, _, files in os.walk(default.snapshot_dir()) for f in files)
  assert total < 1_000_000
  s = stats.summarize(default.load_default())
  assert 20 <= s["tokens"]["mean_per_doc"] <= 100


def test_generator_reproduces_snapshot(tmp_path):
  """Same Python release + same seed -> byte-identical snapshot (the packaged one pins one release)."""
  import platform
  from genret_jax.corpora import make_default_corpus
  meta = default.metadata()
  kw = dict(seed=meta["seed"], num_docs=1500, fractions=(0.8, 0.1, 0.1), **meta["filters"])
  rebuilt = make_default_corpus.build(str(tmp_path / "a"), **kw)
  assert sum(rebuilt["splits"].values()) == rebuilt["num_docs"]
  assert rebuilt["splits"]["train"] == round(0.8 * rebuilt["num_docs"])
  if platform.python_version() == meta["python_version"]:
    # meta.json's "dropped" counts may differ under pytest (it patches a few stdlib functions); the data may not.
    for name in ("corpus.jsonl.gz", "queries.jsonl.gz", "qrels/train.tsv", "qrels/validation.tsv",
                 "qrels/test.tsv"):
      assert (tmp_path / "a" / name).read_bytes() == open(os.path.join(default.snapshot_dir(), name), "rb").read()
  else:  # another release has other docstrings: check the generator is at least deterministic
    make_default_corpus.build(str(tmp_path / "b"), **kw)
    for name in ("corpus.jsonl.gz", "queries.jsonl.gz", "qrels/test.tsv"):
      assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
