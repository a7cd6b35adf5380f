"""TREC run files, per-query JSONL, metrics JSON and resumable batches (retrieval/run_files.py)."""

import json
import os

import pytest

from genret_jax.errors import InputError
from genret_jax.retrieval import run_files as rf


def _batch(b):
  return [rf.QueryResult(f"q{b}-{i}", [f"d{b}{i}", f"d{i}x"], [-0.5 * i, -1.0 - i], {"stats": {"n": i}})
          for i in range(3)]


def test_trec_run_round_trip(tmp_path):
  run = {"q1": [("d1", 2.5), ("d2", 1.0)], "q2": [("d3", -0.25)]}
  path = str(tmp_path / "run.trec")
  rf.write_trec_run(path, run, tag="exp1")
  lines = open(path).read().splitlines()
  assert lines[0] == "q1 Q0 d1 1 2.5 exp1" and lines[2] == "q2 Q0 d3 1 -0.25 exp1"
  assert rf.read_trec_run(path) == run
  with pytest.raises(InputError):
    rf.write_trec_run(path, {"q": [("bad id", 1.0)]})


def test_trec_reader_errors_name_the_line(tmp_path):
  path = tmp_path / "bad.trec"
  path.write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 two 0.4 t\n")
  with pytest.raises(InputError, match=r"bad.trec:2"):
    rf.read_trec_run(str(path))
  path.write_text("q1 Q0 d1 1 0.5\n")
  with pytest.raises(InputError, match=r"bad.trec:1"):
    rf.read_trec_run(str(path))


def test_store_round_trip_and_outputs(tmp_path):
  store = rf.ResultsStore(str(tmp_path), meta={"ckpt": "a", "beam": 5})
  store.write_batch(1, _batch(1))
  store.write_batch(0, _batch(0))
  got = store.results()
  assert [r.query_id for r in got] == [f"q0-{i}" for i in range(3)] + [f"q1-{i}" for i in range(3)]
  assert got[4] == _batch(1)[1]
  run = rf.read_trec_run(store.write_run(tag="t"))
  assert run["q1-2"] == [("d12", -1.0), ("d2x", -3.0)]
  path = store.write_metrics({"nDCG@10": 0.5})
  assert json.load(open(path)) == {"nDCG@10": 0.5}
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
  with pytest.raises(InputError):
    store.write_batch(0, _batch(0))
  with pytest.raises(InputError):
    store.write_batch(2, [rf.QueryResult("q", ["a"], [1.0], {"scores": 1})])


def test_resume_computes_only_missing_batches(tmp_path):
  calls = []

  def compute(b):
    calls.append(b)
    if b == 2 and len(calls) == 3:
      raise RuntimeError("preempted")
    return _batch(b)

  store = rf.ResultsStore(str(tmp_path), meta={"ckpt": "a"})
  with pytest.raises(RuntimeError):
    rf.process_batches(store, range(4), compute, progress=False)
  assert calls == [0, 1, 2] and store.completed_batches == {0, 1}
  # Restart: a fresh store over the same directory skips the two finished batches.
  store = rf.ResultsStore(str(tmp_path), meta={"ckpt": "a"})
  calls.clear()
  counts = rf.process_batches(store, range(4), compute, progress=True)
  assert calls == [2, 3]
  assert counts == {"batches_total": 4, "batches_skipped": 2, "batches_computed": 2}
  assert [r.query_id for r in store.results()] == [f"q{b}-{i}" for b in range(4) for i in range(3)]


def test_partial_last_batch_is_cut_and_redone(tmp_path):
  store = rf.ResultsStore(str(tmp_path))
  store.write_batch(0, _batch(0))
  store.write_batch(1, _batch(1))
  path = tmp_path / rf.RESULTS_FILE
  data = path.read_bytes()
  lines = data.split(b"\n")
  # Killed while appending batch 1: its first line complete, the second half-written.
  cut = len(b"\n".join(lines[:4])) + 1 + len(lines[4]) // 2
  path.write_bytes(data[:cut])
  store = rf.ResultsStore(str(tmp_path))
  assert store.completed_batches == {0} and store.report["partial_lines_dropped"] == 2
  assert path.read_bytes() == b"\n".join(lines[:3]) + b"\n"
  counts = rf.process_batches(store, range(2), _batch, progress=False)
  assert counts["batches_computed"] == 1 and len(store.results()) == 6


def test_meta_mismatch_and_overwrite(tmp_path):
  store = rf.ResultsStore(str(tmp_path), meta={"ckpt": "a", "beam": 5})
  store.write_batch(0, _batch(0))
  with pytest.raises(InputError, match="beam"):
    rf.ResultsStore(str(tmp_path), meta={"ckpt": "a", "beam": 20})
  store = rf.ResultsStore(str(tmp_path), meta={"ckpt": "a", "beam": 20}, overwrite=True)
  assert store.completed_batches == set() and store.results() == []


def test_corrupt_middle_line_is_an_error(tmp_path):
  store = rf.ResultsStore(str(tmp_path))
  store.write_batch(0, _batch(0))
  path = tmp_path / rf.RESULTS_FILE
  lines = path.read_text().splitlines(keepends=True)
  lines[1] = "{not json\n"
  path.write_text("".join(lines))
  with pytest.raises(InputError, match=r"results.jsonl:2"):
    rf.ResultsStore(str(tmp_path))
