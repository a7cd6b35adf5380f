"""Corpus readers: exact counts on the shared collections, every bad-input case, counting of flagged items."""

from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys

import pytest

from genret_jax import corpora
from genret_jax.corpora import normalize, stats
from genret_jax.errors import InputError


def _write(path: pathlib.Path, text: str | bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  data = text.encode("utf-8") if isinstance(text, str) else text
  if path.name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return path


def _jsonl(rows) -> str:
  return "".join(json.dumps(r) + "\n" for r in rows)


def _beir(root: pathlib.Path, docs=None, queries=None, qrels=None) -> pathlib.Path:
  """A small BEIR directory; `qrels` maps split -> TSV body (header added)."""
  docs = docs if docs is not None else _jsonl([
      {"_id": "d1", "title": "Alpha", "text": "alpha beta gamma"},
      {"_id": "d2", "title": "Beta", "text": "delta epsilon"},
      {"_id": "d3", "title": "", "text": ""},
  ])
  queries = queries if queries is not None else _jsonl([
      {"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "delta?"}, {"_id": "q3", "text": "nothing"}])
  qrels = qrels if qrels is not None else {"test": "q1\td1\t2\nq1\td2\t0\n", "dev": "q2\td2\t1\n"}
  _write(root / "corpus.jsonl", docs)
  _write(root / "queries.jsonl", queries)
  for split, body in qrels.items():
    _write(root / "qrels" / f"{split}.tsv", "query-id\tcorpus-id\tscore\n" + body)
  return root


def _expect_error(match_path: pathlib.Path, line: int | None, fn, *args, **kw) -> InputError:
  with pytest.raises(InputError) as info:
    fn(*args, **kw)
  err = info.value
  assert err.path == str(match_path), str(err)
  assert err.line == line, str(err)
  where = f"{match_path}:{line}" if line is not None else str(match_path)
  assert str(err).startswith(where), str(err)
  return err


# ----- the shared collections: exact counts -----

def test_cranfield_counts(cranfield_dir):
  c = corpora.load(str(cranfield_dir))
  assert len(c.documents) == 1400
  assert len(c.queries) == 225
  assert sum(len(j) for j in c.qrels.values()) == 1837
  assert c.splits == ["test"]
  # Docs 471 and 995 are empty: kept (document order is the doc index) and counted.
  assert c.report["empty_documents"] == 2
  assert c.documents[c.doc_index("471")].text == ""
  assert c.report["unjudged_queries"] == 0
  assert c.documents[0].doc_id == "1"


def test_scifact_counts(scifact_dir):
  c = corpora.load(str(scifact_dir))
  assert len(c.documents) == 5183
  assert len(c.queries) == 1109
  assert len(c.queries_in("train")) == 809
  assert len(c.queries_in("test")) == 300
  s = stats.summarize(c)
  assert s["judged_queries_per_split"] == {"test": 300, "train": 809}
  assert s["qrels_per_split"] == {"test": 339, "train": 919}
  assert s["unjudged_queries"] == 0


def test_beir_splits_and_counts(tmp_path):
  c = corpora.load(str(_beir(tmp_path)))
  assert [(q.query_id, q.split) for q in c.queries] == [("q1", "test"), ("q2", "validation"), ("q3", "test")]
  assert c.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1}}
  assert c.positives("q1") == ["d1"]
  assert c.report["empty_documents"] == 1
  assert c.report["unjudged_queries"] == 1
  s = stats.summarize(c)
  assert s["qrels_per_grade"] == {"0": 1, "1": 1, "2": 1}
  assert s["judged_queries"] == 2 and s["unjudged_queries"] == 1
  assert s["tokens"]["total"] == 1 + 3 + 1 + 2


def test_beir_metadata_split_and_conflict(tmp_path):
  queries = _jsonl([{"_id": "q1", "text": "a", "metadata": {"split": "train"}},
                    {"_id": "q2", "text": "b", "metadata": {"split": "train"}},
                    {"_id": "q3", "text": "c", "metadata": {"split": "train"}}])
  c = corpora.load(str(_beir(tmp_path, queries=queries, qrels={"test": "q1\td1\t1\n"})))
  assert {q.query_id: q.split for q in c.queries} == {"q1": "test", "q2": "train", "q3": "train"}
  assert c.report["split_conflicts"] == 1
  assert c.report["unjudged_queries"] == 2


def test_beir_gzip_queries_and_integer_ids(tmp_path):
  _write(tmp_path / "corpus.jsonl.gz", _jsonl([{"_id": 7, "text": "seven"}, {"id": "8", "text": "eight"}]))
  _write(tmp_path / "queries.jsonl.gz", _jsonl([{"_id": 1, "text": "which"}]))
  _write(tmp_path / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\n1\t7\t1\n")
  c = corpora.load(str(tmp_path))
  assert [d.doc_id for d in c.documents] == ["7", "8"]
  assert c.qrels == {"1": {"7": 1}} and c.queries[0].split == "train"


def test_jsonl_corpus(tmp_path):
  path = _write(tmp_path / "docs.jsonl", _jsonl([{"id": "a", "title": "T", "text": "x y"}]) + "\n")
  c = corpora.load(str(path))
  assert c.documents[0].title == "T" and not c.queries
  assert c.report["blank_lines"] == 1


def test_max_docs_counts_the_rest(tmp_path):
  c = corpora.load(str(_beir(tmp_path)), max_docs=1)
  assert len(c.documents) == 1
  assert c.report["documents_beyond_max_docs"] == 2
  assert c.report["qrels_beyond_max_docs"] == 2


def test_dpr_passages(tmp_path):
  path = _write(tmp_path / "psgs.tsv",
                'id\ttext\ttitle\n1\t"Aaron ( or ; ""Aharon"") was a prophet"\tAaron\n2\tplain text\tBob\n')
  c = corpora.load(str(path))
  assert [(d.doc_id, d.title, d.text) for d in c.documents] == [
      ("1", "Aaron", 'Aaron ( or ; "Aharon") was a prophet'), ("2", "Bob", "plain text")]


def test_nq_questions_attach(tmp_path):
  psgs = _write(tmp_path / "psgs.tsv.gz", "id\ttext\ttitle\n1\tsome text\tT\n")
  qa = _write(tmp_path / "nq-test.qa.csv",
              "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
              "how many\t['3', 'three']\n")
  queries = corpora.load_questions(str(qa))
  assert [(q.query_id, q.split, q.answers) for q in queries] == [
      ("test-0", "test", ("Wilhelm Conrad Röntgen",)), ("test-1", "test", ("3", "three"))]
  c = corpora.load_questions(str(qa), corpora.load(str(psgs)), split="validation", id_prefix="nq")
  assert [q.query_id for q in c.queries] == ["nq-0", "nq-1"]
  assert c.report["unjudged_queries"] == 2 and c.report["queries_with_answers"] == 2
  with pytest.raises(InputError, match="already names a query"):
    corpora.load_questions(str(qa), c, split="validation", id_prefix="nq")


def test_detect_format(tmp_path, cranfield_dir):
  assert corpora.detect_format(str(cranfield_dir)) == "beir"
  assert corpora.detect_format(str(_write(tmp_path / "p.tsv", "id\ttext\ttitle\n1\ta\tb\n"))) == "dpr"
  assert corpora.detect_format(str(_write(tmp_path / "c.jsonl.gz", '{"id": "1", "text": "a"}\n'))) == "jsonl"
  assert corpora.detect_format("default") == "default"
  with pytest.raises(InputError, match="question file"):
    corpora.load(str(_write(tmp_path / "q.tsv", "who\t['x']\n")))


def test_normalize_is_optional(tmp_path):
  path = _write(tmp_path / "c.jsonl", _jsonl([{"id": "1", "title": " T ", "text": "a\n\tb  BULLET::::c "}]))
  assert corpora.load(str(path)).documents[0].text == "a\n\tb  BULLET::::c "
  doc = corpora.load(str(path), normalize=True).documents[0]
  assert (doc.title, doc.text) == ("T", "a b c")
  assert normalize.normalize_body("  x \n y ") == "x y"


def test_ir_datasets_without_package_is_input_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "ir_datasets", None)  # importing it now raises ImportError
  with pytest.raises(InputError, match="ir_datasets package is not installed"):
    corpora.load("irds:beir/scifact")
  with pytest.raises(InputError, match="no such file or directory"):
    corpora.load("no/such/path")


def _fake_ir_datasets(monkeypatch, *, cached: bool):
  """A stand-in ir_datasets package: docs/queries/qrels iterators; uncached docs go through RequestsDownload."""
  import collections
  import types
  pkg, util, download = (types.ModuleType(n) for n in ("ir_datasets", "ir_datasets.util",
                                                       "ir_datasets.util.download"))

  class RequestsDownload:
    url = "https://example.invalid/docs.gz"

    def __iter__(self):
      yield b"network bytes"

  download.RequestsDownload = RequestsDownload
  Doc = collections.namedtuple("Doc", "doc_id title text")
  Q = collections.namedtuple("Q", "query_id text")
  R = collections.namedtuple("R", "query_id doc_id relevance iteration")

  class Dataset:
    def has_docs(self): return True
    def has_queries(self): return True
    def has_qrels(self): return True
    def docs_iter(self):
      if not cached:
        list(RequestsDownload())
      yield from [Doc("d1", "T", "text one"), Doc("d2", "", "")]
    def queries_iter(self): yield Q("q1", "one?")
    def qrels_iter(self): yield R("q1", "d1", 1, "0")

  pkg.load = lambda name: Dataset() if name.startswith("toy") else (_ for _ in ()).throw(KeyError(name))
  pkg.util, util.download = util, download
  for name, mod in (("ir_datasets", pkg), ("ir_datasets.util", util), ("ir_datasets.util.download", download)):
    monkeypatch.setitem(sys.modules, name, mod)


def test_ir_datasets_reader_with_cached_files(monkeypatch):
  _fake_ir_datasets(monkeypatch, cached=True)
  c = corpora.load("irds:toy/dev")
  assert [d.doc_id for d in c.documents] == ["d1", "d2"]
  assert [(q.query_id, q.split) for q in c.queries] == [("q1", "validation")]
  assert c.qrels == {"q1": {"d1": 1}} and c.report["empty_documents"] == 1
  assert corpora.detect_format("toy/test") == "ir_datasets"  # bare name once the package is importable


def test_ir_datasets_reader_never_downloads(monkeypatch):
  _fake_ir_datasets(monkeypatch, cached=False)
  with pytest.raises(InputError, match="not in the local cache"):
    corpora.load("irds:toy")
  with pytest.raises(InputError, match="unknown ir_datasets name"):
    corpora.load("irds:nope")


# ----- bad input: one error naming file and line -----

def test_error_malformed_json_line(tmp_path):
  path = _write(tmp_path / "c.jsonl", '{"id": "1", "text": "a"}\n{"id": "2", "text": \n')
  err = _expect_error(path, 2, corpora.load, str(path))
  assert "malformed JSON" in err.message


def test_error_malformed_json_in_beir_queries(tmp_path):
  root = _beir(tmp_path, queries='{"_id": "q1", "text": "a"}\n[1, 2]\n', qrels={})
  err = _expect_error(root / "queries.jsonl", 2, corpora.load, str(root))
  assert "JSON object" in err.message


def test_error_malformed_tsv_row_dpr(tmp_path):
  path = _write(tmp_path / "p.tsv", "id\ttext\ttitle\n1\ta\tb\n2\tonly two\n")
  err = _expect_error(path, 3, corpora.load, str(path))
  assert "expected 3 tab-separated columns" in err.message


def test_error_malformed_tsv_row_qrels(tmp_path):
  root = _beir(tmp_path, qrels={"test": "q1\td1\t1\nq2 d2 1\n"})
  err = _expect_error(root / "qrels" / "test.tsv", 3, corpora.load, str(root))
  assert "columns" in err.message


def test_error_malformed_tsv_row_questions(tmp_path):
  path = _write(tmp_path / "nq.csv", "q one\t['a']\nq two\t['b']\textra\n")
  err = _expect_error(path, 2, corpora.load_questions, str(path))
  assert "expected 2 tab-separated columns" in err.message


def test_error_bad_answer_list(tmp_path):
  path = _write(tmp_path / "nq.csv", "q one\tnot a list\n")
  _expect_error(path, 1, corpora.load_questions, str(path))


def test_error_bad_grade(tmp_path):
  root = _beir(tmp_path, qrels={"test": "q1\td1\thigh\n"})
  err = _expect_error(root / "qrels" / "test.tsv", 2, corpora.load, str(root))
  assert "integer" in err.message


def test_error_missing_text_field(tmp_path):
  path = _write(tmp_path / "c.jsonl", _jsonl([{"id": "1", "text": "a"}, {"id": "2", "title": "no body"}]))
  err = _expect_error(path, 2, corpora.load, str(path))
  assert "missing required field 'text'" in err.message


def test_error_missing_id_field(tmp_path):
  root = _beir(tmp_path, docs=_jsonl([{"title": "x", "text": "y"}]))
  err = _expect_error(root / "corpus.jsonl", 1, corpora.load, str(root))
  assert "'_id' or 'id'" in err.message


def test_error_missing_query_text(tmp_path):
  root = _beir(tmp_path, queries=_jsonl([{"_id": "q1"}]), qrels={})
  err = _expect_error(root / "queries.jsonl", 1, corpora.load, str(root))
  assert "'text'" in err.message


def test_error_duplicate_doc_ids(tmp_path):
  path = _write(tmp_path / "c.jsonl", _jsonl([{"id": "1", "text": "a"}, {"id": "2", "text": "b"},
                                              {"id": "1", "text": "c"}]))
  err = _expect_error(path, 3, corpora.load, str(path))
  assert "duplicate document id '1'" in err.message and f"{path}:1" in err.message


def test_error_duplicate_doc_ids_dpr(tmp_path):
  path = _write(tmp_path / "p.tsv", "id\ttext\ttitle\n5\ta\tb\n5\tc\td\n")
  _expect_error(path, 3, corpora.load, str(path))


def test_error_qrels_unknown_doc(tmp_path):
  root = _beir(tmp_path, qrels={"test": "q1\td1\t1\nq1\td99\t1\n"})
  err = _expect_error(root / "qrels" / "test.tsv", 3, corpora.load, str(root))
  assert "unknown document id 'd99'" in err.message


def test_error_qrels_unknown_query(tmp_path):
  root = _beir(tmp_path, qrels={"train": "q42\td1\t1\n"})
  err = _expect_error(root / "qrels" / "train.tsv", 2, corpora.load, str(root))
  assert "unknown query id 'q42'" in err.message


def test_error_conflicting_qrels(tmp_path):
  root = _beir(tmp_path, qrels={"test": "q1\td1\t1\nq1\td1\t2\n"})
  _expect_error(root / "qrels" / "test.tsv", 3, corpora.load, str(root))


def test_error_non_utf8(tmp_path):
  path = _write(tmp_path / "c.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "caf\xe9"}\n')
  err = _expect_error(path, 2, corpora.load, str(path))
  assert "UTF-8" in err.message


def test_error_non_utf8_gzip_tsv(tmp_path):
  path = _write(tmp_path / "p.tsv.gz", b"id\ttext\ttitle\n1\ta\tb\n2\t\xff\tc\n")
  _expect_error(path, 3, corpora.load, str(path))


def test_error_empty_corpus(tmp_path):
  path = _write(tmp_path / "c.jsonl", "\n\n")
  err = _expect_error(path, None, corpora.load, str(path), format="jsonl")
  assert "empty corpus" in err.message


def test_error_empty_beir_corpus(tmp_path):
  root = _beir(tmp_path, docs="", qrels={})
  _expect_error(root / "corpus.jsonl", None, corpora.load, str(root))


def test_error_missing_dpr_header(tmp_path):
  path = _write(tmp_path / "p.tsv", "1\ta\tb\n")
  err = _expect_error(path, 1, corpora.load, str(path), format="dpr")
  assert "header" in err.message


def test_error_corrupt_gzip(tmp_path):
  path = tmp_path / "c.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"id": "1", "text": "a"}\n' * 50)[:-30])
  with pytest.raises(InputError, match="gzip") as info:
    corpora.load(str(path))
  assert info.value.path == str(path)


def test_readers_do_not_import_jax():
  code = ("import sys, genret_jax.corpora as c, genret_jax.corpora.inspect, genret_jax.corpora.default; "
          "c.load('default'); assert not {'jax', 'tensorflow', 'flax'} & set(sys.modules), 'heavy import'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_error_not_a_beir_dir(tmp_path):
  _expect_error(tmp_path, None, corpora.load, str(tmp_path))


def test_nothing_read_or_skipped_silently(tmp_path):
  """A stray quote in a DPR TSV swallowing the next passage, a row of empty fields, a qrels file with another
  extension, and both corpus.jsonl and corpus.jsonl.gz: counted, refused or named (each was silent)."""
  path = _write(tmp_path / "p.tsv", 'id\ttext\ttitle\n1\t"unbalanced quote\tT\n2\tswallowed\tU\n3\tend"\tV\n4\tok\tW\n')
  c = corpora.load(str(path), format="dpr")
  assert len(c.documents) == 2 and c.report["passages_over_several_lines"] == 1
  root = _beir(tmp_path / "b", qrels={"test": "q1\td1\t2\n\t\t\n"})
  _expect_error(root / "qrels" / "test.tsv", 3, corpora.load, str(root))
  root = _beir(tmp_path / "c")
  _write(root / "qrels" / "extra.txt", "q2\td2\t1\n")
  assert corpora.load(str(root)).report["qrels_files_ignored"] == 1
  _write(root / "corpus.jsonl.gz", gzip.compress((root / "corpus.jsonl").read_bytes()))
  _expect_error(root, None, corpora.load, str(root))


def test_empty_queries_are_counted(tmp_path):
  root = _beir(tmp_path / "q", queries=_jsonl([{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "   "}]),
               qrels={"test": "q1\td1\t1\n"})
  assert corpora.load(str(root)).report["empty_queries"] == 1
