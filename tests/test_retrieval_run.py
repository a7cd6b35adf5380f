"""Host half of `genret retrieve` (retrieval/run.py) on hand-made beam outputs."""

import json
import types

import numpy as np
import pytest

from genret_jax.errors import InputError
from genret_jax.retrieval import run as rr
from genret_jax.retrieval import run_files as rf
from genret_jax.retrieval.docids import DocidLookup
from genret_jax.retrieval.ngram_scoring import NgramScoringConfig
from test_retrieval_scoring import DOCS, BruteForceIndex

DOC_IDS = [f"doc{i}" for i in range(len(DOCS))]


def _beams():
  # 3 rows: two real queries and one batch-padding row.
  tokens = np.array([[[4, 4, 0], [3, 0, 0], [4, 4, 0]],
                     [[9, 9, 9], [3, 0, 0], [0, 0, 0]],
                     [[0, 0, 0], [0, 0, 0], [0, 0, 0]]])
  return types.SimpleNamespace(tokens=tokens, lengths=np.array([[2, 1, 2], [3, 1, 0], [0, 0, 0]]),
                               scores=np.array([[-0.1, -0.2, -0.3], [-0.5, -0.6, 0.0], [0.0] * 3]),
                               valid=np.array([[True, True, True], [True, True, False], [False] * 3]),
                               history=None)


def test_docid_batch():
  lookup = DocidLookup.from_identifiers([[3], [4, 4], [5]])
  res = rr.retrieve_batch(_beams(), ["qa", "qb"], ["d0", "d1", "d2"], lookup=lookup, k=10)
  assert [r.query_id for r in res] == ["qa", "qb"]
  assert res[0].doc_ids == ["d1", "d0"] and res[0].scores == [-0.1, -0.2]
  assert res[0].extra["num_duplicates"] == 1
  assert res[1].doc_ids == ["d0"] and res[1].extra["num_invalid"] == 1
  assert res[1].extra["identifiers"] == [[9, 9, 9], [3]]
  with pytest.raises(InputError):
    rr.retrieve_batch(_beams(), ["qa"], ["d0"])


def test_ngram_batch_and_finalize(tmp_path):
  index = BruteForceIndex(DOCS)
  hist = types.SimpleNamespace(
      tokens=np.array([[[1, 2, 3], [2, 3, 0], [9, 0, 0]], [[5, 6, 0], [6, 7, 0], [0, 0, 0]]]),
      lengths=np.array([[3, 2, 1], [2, 2, 0]]),
      log_probs=np.array([[-0.1, -0.3, -0.5], [-0.2, -0.6, 0.0]], np.float32),
      counts=np.array([[2, 4, 4], [-1, -1, -1]]),
      valid=np.array([[True, True, True], [True, True, False]]))
  beams = types.SimpleNamespace(history=hist)
  cfg = NgramScoringConfig(hits=3)
  res = rr.retrieve_batch(beams, ["qa", "qb"], DOC_IDS, index=index, cfg=cfg)
  assert res[0].doc_ids[0] == "doc4" and len(res[0].doc_ids) == 3  # A + discounted B beats A alone
  assert res[1].doc_ids == ["doc5"]
  assert res[0].extra["stats"]["keys_rare"] == 3
  with pytest.raises(InputError, match="keep_history"):
    rr.retrieve_batch(_beams(), ["qa"], DOC_IDS, index=index)

  store = rf.ResultsStore(str(tmp_path), meta={"scheme": "ngram"})
  store.write_batch(0, res)
  qrels = {"qa": {"doc4": 1}, "qb": {"doc1": 1}}
  texts = {d: " ".join(map(str, toks)) for d, toks in zip(DOC_IDS, DOCS)}
  out = rr.finalize(store, tag="t", qrels=qrels, answers={"qa": ["2 3 10"], "qb": ["nope"]},
                    doc_text=texts.__getitem__, cutoffs=(1, 10))
  assert out["metrics"]["Hits@1"] == 0.5 and out["metrics"]["AnswerHits@1"] == 0.5
  assert json.load(open(tmp_path / rf.METRICS_FILE))["metrics"]["MRR@10"] == 0.5
  assert rf.read_trec_run(str(tmp_path / rf.RUN_FILE))["qb"][0][0] == "doc5"


def test_retrieval_config_and_beam_are_checked():
  """A beam of 0 fell back to the configured beam (20) while the sweep recorded the row as beam 0."""
  from genret_jax.retrieval.pipeline import RetrievalConfig, Retriever
  for field, bad in (("beam_size", 0), ("batch_size", -1), ("hits", 0), ("inputs_length", "64")):
    with pytest.raises(InputError, match=f"RetrievalConfig.{field}"):
      RetrievalConfig(**{field: bad})
  retriever = Retriever.__new__(Retriever)   # the beam is checked before anything is decoded
  retriever.cfg = RetrievalConfig()
  with pytest.raises(InputError, match="config key beam"):
    retriever.retrieve([], beam=0)
