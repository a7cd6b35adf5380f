"""Identifier schemes on Cranfield and SciFact: round trips, determinism, save/load, n-gram targets."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from genret_jax import corpora, identifiers
from genret_jax.corpora.types import Collection, Document, Query
from genret_jax.errors import InputError
from genret_jax.identifiers import spans
from genret_jax.identifiers.stopwords import ENGLISH_STOP_WORDS

# Small vectors keep the learned schemes fast; the algorithms are the same at any size.
FAST_CFG = {
    "atomic": {}, "naive": {}, "title": {}, "ngram": {},
    "semantic": {"branching": 8, "leaf_size": 40, "dim": 16, "max_features": 4000},
    "codebook": {"levels": 3, "codes": 16, "dim": 16, "max_features": 4000},
}


@pytest.fixture(scope="session")
def cranfield(cranfield_dir):
  return corpora.load(str(cranfield_dir))


@pytest.fixture(scope="session")
def scifact(scifact_dir):
  return corpora.load(str(scifact_dir))


_built = {}


def built(collection, name, seed=0):
  key = (collection.name, name, seed)
  if key not in _built:
    _built[key] = identifiers.build(name, collection, seed=seed, **FAST_CFG[name])
  return _built[key]


def toy_collection(docs, queries=()):
  return Collection("toy", [Document(*d) for d in docs], [Query(*q) for q in queries], {})


@pytest.mark.parametrize("corpus", ["cranfield", "scifact"])
@pytest.mark.parametrize("name", ["atomic", "naive", "title", "semantic", "codebook"])
def test_docid_round_trip(request, corpus, name):
  collection = request.getfixturevalue(corpus)
  scheme = built(collection, name)
  ids = [scheme.doc_identifiers(i) for i in range(len(collection.documents))]
  assert all(len(x) == 1 and x[0] for x in ids)
  assert len({x[0] for x in ids}) == len(ids)  # unique
  for i, (docid,) in enumerate(ids):
    assert scheme.docs_for(docid) == [i]
    assert scheme.retrieval_targets("any query", i, seed=3) == [docid]
  # Every added token is used by some identifier or is a code value; identifiers use only added tokens.
  added = set(scheme.added_tokens())
  for (docid,) in ids:
    for tok in re.findall(r"<[^<>\s]+>", docid):
      assert tok in added


def test_scheme_specific_shapes(cranfield):
  assert built(cranfield, "atomic").doc_identifiers(5) == ["<d_5>"]
  assert built(cranfield, "naive").doc_identifiers(0) == [cranfield.documents[0].doc_id]
  title = built(cranfield, "title")
  assert title.doc_identifiers(0)[0].startswith("experimental investigation of the aerodynamics")
  sem = built(cranfield, "semantic")
  for path in sem.paths:
    assert all(v < 8 for v in path[:-1]) and path[-1] < 40  # branching and leaf size respected
  cb = built(cranfield, "codebook")
  assert all(len(re.findall(r"<c\d+_\d+>", d)) == 3 + (cb.max_collision > 1) for d in cb.docids)


def test_ngram_targets_occur_in_their_documents(cranfield, scifact):
  for collection in (cranfield, scifact):
    scheme = built(collection, "ngram")
    checked = 0
    for q in collection.queries[:6]:
      for doc_id in collection.positives(q.query_id)[:2]:
        idx = collection.doc_index(doc_id)
        targets = scheme.retrieval_targets(q.text, idx, seed=0)
        body = " " + " ".join(collection.documents[idx].text.split()) + " "
        if body.strip():
          assert len(targets) == 10
        for t in targets:
          words = t.split()
          assert 1 <= len(words) <= 10
          assert f" {t} " in body or f" {t} " in f" {scheme.document_string(idx)} "
          assert idx in scheme.docs_for(t)
        checked += 1
    assert checked >= 6
    for idx in (0, 1, len(collection.documents) - 1):
      for view in scheme.doc_identifiers(idx):
        assert idx in scheme.docs_for(view)
    for src, tgt in scheme.indexing_examples(0):
      assert src and 0 in scheme.docs_for(tgt)


def test_ngram_document_string_and_pseudo_queries(tmp_path):
  pq = tmp_path / "pq.json"
  pq.write_text(json.dumps({"b": ["what is a wing", "lift question"]}))
  c = toy_collection([("a", "Alpha", "the wing lift is large here"),
                      ("b", "Beta", "a wing in a slipstream has more lift"),
                      ("c", "", "")])
  s = identifiers.build("ngram", c, seed=0, views=["body", "title", "query"], n_samples=4,
                        min_length=2, max_length=3, pseudo_queries_file=str(pq))
  assert s.document_string(1) == ("Beta <title_eos> a wing in a slipstream has more lift "
                                  "<pq_bos> what is a wing <pq_eos> <pq_bos> lift question <pq_eos>")
  targets = s.retrieval_targets("wing lift", 1, seed=0)
  assert len(targets) == 4 + 3 + 5
  assert targets[4:7] == ["Beta <title_eos>"] * 3
  assert targets[7:] == ["<pq_bos> what is a wing <pq_eos>", "<pq_bos> lift question <pq_eos>",
                         "<pq_bos> lift question <pq_eos>", "<pq_bos> lift question <pq_eos>",
                         "<pq_bos> lift question <pq_eos>"]
  s.save(str(tmp_path / "ng"))
  assert identifiers.load(str(tmp_path / "ng"), c) == s
  assert s.docs_for("wing") == [0, 1] and s.docs_for("wing lift") == [0] and s.docs_for("zzz") == []
  assert s.retrieval_targets("anything", 2, seed=0) == []  # no title, no body: nothing to target
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"nope": ["q"]}))
  with pytest.raises(InputError, match="unknown document"):
    identifiers.build("ngram", c, pseudo_queries_file=str(bad))


def test_span_sampling_follows_reference():
  assert len(ENGLISH_STOP_WORDS) == 179 and "mightn't" in ENGLISH_STOP_WORDS
  assert spans.fuzz_ratio("abc", "abc") == 100 and spans.fuzz_ratio("", "x") == 0
  assert spans.fuzz_ratio("wing lift", "wing drag") == 56  # "wing " matches: round(100 * 2*5/18)
  words = ("the boundary layer of a swept wing separates near the tip while the flow "
           "over the fuselage stays attached at every angle tested here").split()
  # Stop words are never span starts; the matched region dominates the samples.
  m = spans.match_scores("swept wing separates", words)
  assert set(m) == {i for i, w in enumerate(words) if w not in ENGLISH_STOP_WORDS}
  assert max(m, key=m.get) == words.index("swept")
  rng = np.random.default_rng(0)
  out = spans.extract_spans(words, "swept wing separates", rng, n_samples=200, min_length=3,
                            max_length=3, temperature=0.2)
  assert len(out) == 200 and all(len(s.split()) == 3 for s in out)
  assert max(set(out), key=out.count) == "swept wing separates"
  # Reference quirks: nothing scorable -> exactly one span from position 0.
  assert spans.extract_spans(words, "", rng) == [" ".join(words[:10])]
  assert spans.extract_spans("the of and".split(), "query", rng) == ["the of and"]
  # Seeded per (seed, query, doc): order-independent and reproducible.
  a = spans.extract_spans(words, "wing tip", spans.span_rng(1, "wing tip", 7))
  b = spans.extract_spans(words, "wing tip", spans.span_rng(1, "wing tip", 7))
  c = spans.extract_spans(words, "wing tip", spans.span_rng(2, "wing tip", 7))
  assert a == b and len(a) == 10 and a != c


def test_span_sampling_in_processes_equals_one_at_a_time(cranfield, monkeypatch):
  ng = identifiers.build("ngram", cranfield, seed=0, views=("body", "title"), title_samples=2)
  pairs = [(q.text, (7 * i + 3) % len(cranfield.documents)) for i, q in enumerate(cranfield.queries[:9])]
  pairs.append(("", 5))   # nothing scorable: the reference's one span
  one_by_one = [ng.retrieval_targets(q, d, seed=3) for q, d in pairs]
  assert all(len(t) == 12 for t in one_by_one[:-1]) and len(one_by_one[-1]) == 3
  # Two spawned processes, chunks of 4 jobs (the default chunk would keep 10 pairs in this process).
  jobs = [(q, ng.body_words(d), d) for q, d in pairs]
  kw = dict(n_samples=10, min_length=10, max_length=10, temperature=1.0)
  in_processes = spans.extract_spans_many(jobs, 3, workers=2, chunk=4, **kw)
  assert in_processes == [t[:-2] for t in one_by_one]
  texts = [(q, cranfield.documents[d].text, d) for q, d in pairs]   # a passage given as its text: split there
  assert spans.extract_spans_many(texts, 3, workers=2, chunk=4, **kw) == in_processes
  assert ng.retrieval_targets_many(pairs, seed=3, workers=1) == one_by_one
  assert spans.default_workers(10) == 1
  monkeypatch.setenv("GENRET_SPAN_WORKERS", "3")
  assert spans.default_workers(10) == 3
  monkeypatch.setenv("GENRET_SPAN_WORKERS", "many")
  with pytest.raises(InputError, match="GENRET_SPAN_WORKERS: must be an integer"):
    spans.default_workers(10)


def test_span_workers_do_not_rerun_the_main_script(tmp_path):
  # A script without a __main__ guard: spawned workers would re-run it (and its imports) before their task.
  runs = tmp_path / "runs.txt"
  script = tmp_path / "unguarded.py"
  script.write_text(f"""
import json
from genret_jax.identifiers import spans
open({str(runs)!r}, "a").write("ran\\n")
words = ("the boundary layer of a swept wing separates near the tip while the flow over the fuselage stays "
         "attached").split()
jobs = [(q, words, d) for d in range(6) for q in ("swept wing", "flow over the tip", "")]
a = spans.extract_spans_many(jobs, 5, workers=2, chunk=4)
b = spans.extract_spans_many(jobs, 5, workers=1)
print(json.dumps(a == b))
""")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "true" and runs.read_text() == "ran\n" and "failed" not in out.stderr


def test_determinism(cranfield):
  for name in ("semantic", "codebook"):
    again = identifiers.build(name, cranfield, seed=0, **FAST_CFG[name])
    assert again == built(cranfield, name) and again.docids == built(cranfield, name).docids
  other = identifiers.build("semantic", cranfield, seed=1, **FAST_CFG["semantic"])
  assert other.docids != built(cranfield, "semantic").docids
  ng = built(cranfield, "ngram")
  q = cranfield.queries[0]
  idx = cranfield.doc_index(cranfield.positives(q.query_id)[0])
  assert ng.retrieval_targets(q.text, idx, 0) == identifiers.build("ngram", cranfield).retrieval_targets(
      q.text, idx, 0)


@pytest.mark.parametrize("name", ["atomic", "naive", "title", "semantic", "codebook", "ngram"])
def test_save_load(tmp_path, cranfield, scifact, name):
  scheme = built(cranfield, name)
  scheme.save(str(tmp_path))
  loaded = identifiers.load(str(tmp_path), cranfield)
  assert loaded == scheme and loaded.added_tokens() == scheme.added_tokens()
  for i in (0, 7, len(cranfield.documents) - 1):
    assert loaded.doc_identifiers(i) == scheme.doc_identifiers(i)
    assert loaded.indexing_examples(i) == scheme.indexing_examples(i)
  with pytest.raises(InputError, match="different corpus"):
    identifiers.load(str(tmp_path), scifact)
  if name != "ngram":  # docid maps work without the collection
    bare = identifiers.load(str(tmp_path))
    assert bare.docs_for(scheme.doc_identifiers(3)[0]) == [3]
    with pytest.raises(InputError, match="without its collection"):
      bare.indexing_examples(0)


def test_title_duplicates_and_collisions():
  c = toy_collection([("a", "Wing", "x one"), ("b", "Wing", "y two"), ("c", "Wing (2)", "z three"),
                      ("d", "", "w four")])
  t = identifiers.build("title", c)
  assert t.docids == ["Wing", "Wing (3)", "Wing (2)", "untitled d"]
  assert t.report == {"duplicate_titles_disambiguated": 1, "untitled_documents": 1}
  same = toy_collection([(str(i), "", "identical text here") for i in range(5)] +
                        [("x", "", "completely different words"), ("y", "", "another topic entirely")])
  cb = identifiers.build("codebook", same, levels=2, codes=2, dim=4)
  assert len(set(cb.docids)) == 7 and cb.max_collision >= 5
  assert all(d.endswith(f"<c2_{r}>") for d, r in zip(cb.docids, cb.ranks))
  sem = identifiers.build("semantic", same, branching=2, leaf_size=2, dim=4)
  assert len(set(sem.docids)) == 7


def test_bad_input(cranfield):
  with pytest.raises(InputError, match="unknown identifier scheme"):
    identifiers.build("nope", cranfield)
  with pytest.raises(InputError) as e:
    identifiers.build("semantic", cranfield, branchin=3)
  assert e.value.key == "branchin"
  with pytest.raises(InputError, match="empty collection"):
    identifiers.build("atomic", toy_collection([]))
  with pytest.raises(InputError, match="no saved identifier scheme"):
    identifiers.load("/nonexistent/dir")


def test_build_ids_command(cranfield_dir, tmp_path, capsys):
  import argparse
  from genret_jax.identifiers import build_ids
  parser = argparse.ArgumentParser()
  build_ids.add_arguments(parser)
  out = tmp_path / "ids"
  assert build_ids.run(parser.parse_args([f"--corpus={cranfield_dir}", "--scheme=title", f"--output={out}"])) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["documents"] == 1400 and summary["report"]["untitled_documents"] == 2
  assert identifiers.load(str(out)).docs_for(summary["examples"]["1"][0]) == [0]
  with pytest.raises(InputError, match="not JSON"):
    build_ids.run(parser.parse_args([f"--corpus={cranfield_dir}", "--scheme=title", "--scheme_config={",
                                     f"--output={out}"]))
