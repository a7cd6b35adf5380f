"""IR metrics and DPR answer matching (retrieval/metrics.py)."""

import csv
import math
import unicodedata

import ir_measures
import numpy as np
import pytest

from genret_jax.errors import InputError
from genret_jax.retrieval import metrics

QRELS = {
    "q1": {"d1": 1, "d2": 2, "d3": 0},
    "q2": {"d4": 1},
    "q3": {"d5": 3, "d6": 1, "d7": 1},
    "q4": {"x": 0},  # judged, nothing relevant
}
RUN = {
    "q1": ["d2", "d5", "d1"],
    "q2": ["d9", "d8"],
    "q3": ["d0", "d6", "d9", "d5"],
    "q4": ["x"],
}


def test_hand_computed():
  r = metrics.evaluate_run(RUN, QRELS, cutoffs=(1, 2, 5))
  assert r.report["queries_evaluated"] == 3 and r.report["queries_without_relevant"] == 1
  pq = r.per_query
  # q1: relevant d1, d2 at ranks 3, 1. q2: nothing found. q3: relevant d5, d6, d7; found d6 (rank 2), d5 (rank 4).
  assert pq["q1"]["Recall@1"] == 0.5 and pq["q1"]["Recall@5"] == 1.0 and pq["q1"]["Hits@1"] == 1.0
  assert pq["q3"]["Recall@2"] == pytest.approx(1 / 3) and pq["q3"]["Recall@5"] == pytest.approx(2 / 3)
  assert pq["q3"]["Hits@1"] == 0.0 and pq["q3"]["Hits@2"] == 1.0
  assert pq["q1"]["MRR@10"] == 1.0 and pq["q2"]["MRR@10"] == 0.0 and pq["q3"]["MRR@10"] == 0.5
  dcg1 = 2 / math.log2(2) + 1 / math.log2(4)
  idcg1 = 2 / math.log2(2) + 1 / math.log2(3)
  dcg3 = 1 / math.log2(3) + 3 / math.log2(5)
  idcg3 = 3 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
  assert pq["q1"]["nDCG@10"] == pytest.approx(dcg1 / idcg1)
  assert pq["q3"]["nDCG@10"] == pytest.approx(dcg3 / idcg3)
  agg = r.aggregate
  assert agg["Recall@1"] == pytest.approx((0.5 + 0 + 0) / 3)
  assert agg["MRR@10"] == pytest.approx((1 + 0 + 0.5) / 3)
  assert agg["nDCG@10"] == pytest.approx((dcg1 / idcg1 + dcg3 / idcg3) / 3)
  assert list(agg) == metrics.measure_names((1, 2, 5))


def test_agrees_with_ir_measures_directly():
  rng = np.random.default_rng(0)
  docs = [f"d{i}" for i in range(30)]
  qrels = {f"q{i}": {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 8, replace=False)} for i in range(10)}
  qrels = {q: j for q, j in qrels.items() if any(g >= 1 for g in j.values())}
  run = {q: list(rng.permutation(docs)[:20]) for q in qrels}
  ours = metrics.evaluate_run(run, qrels).aggregate
  scored = {q: {d: 100.0 - i for i, d in enumerate(r)} for q, r in run.items()}
  theirs = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in
                                       ("R@5", "R@20", "Success@1", "RR@10", "nDCG@10")], qrels, scored)
  theirs = {str(k): v for k, v in theirs.items()}
  assert ours["Recall@5"] == pytest.approx(theirs["R@5"])
  assert ours["Recall@20"] == pytest.approx(theirs["R@20"])
  assert ours["Hits@1"] == pytest.approx(theirs["Success@1"])
  assert ours["MRR@10"] == pytest.approx(theirs["RR@10"])
  assert ours["nDCG@10"] == pytest.approx(theirs["nDCG@10"])


def test_ties_keep_given_order_and_missing_queries_count_zero():
  # Same system score everywhere would let trec_eval reorder by docid; we evaluate the given order.
  r = metrics.evaluate_run({"q": ["a", "b"]}, {"q": {"a": 1}, "p": {"z": 1}}, query_ids=["q", "p"])
  assert r.per_query["q"]["Hits@1"] == 1.0 and r.per_query["p"]["Hits@100"] == 0.0
  assert r.aggregate["Hits@1"] == 0.5 and r.report["queries_without_results"] == 1
  with pytest.raises(InputError):
    metrics.evaluate_run({"q": ["a", "a"]}, {"q": {"a": 1}})


def _cranfield_qrels(cranfield_dir):
  qrels = {}
  with open(cranfield_dir / "qrels" / "test.tsv", encoding="utf-8") as f:
    for row in csv.DictReader(f, delimiter="\t"):
      qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
  return qrels


def test_cranfield_perfect_and_random_runs(cranfield_dir):
  qrels = _cranfield_qrels(cranfield_dir)
  docs = sorted({d for j in qrels.values() for d in j})
  perfect = {q: sorted((d for d, g in j.items() if g >= 1), key=lambda d: (-j[d], d)) for q, j in qrels.items()}
  assert max(len(r) for r in perfect.values()) <= 100
  good = metrics.evaluate_run(perfect, qrels, query_ids=list(qrels))
  assert good.report["queries_evaluated"] > 200
  for name in ("Recall@100", "Hits@1", "MRR@10", "nDCG@10"):
    assert good.aggregate[name] == pytest.approx(1.0), name
  rng = np.random.default_rng(0)
  random_run = {q: list(rng.permutation(docs)[:100]) for q in qrels}
  bad = metrics.evaluate_run(random_run, qrels, query_ids=list(qrels))
  for name in ("Recall@100", "Hits@1", "MRR@10", "nDCG@10"):
    assert bad.aggregate[name] < 0.5 * good.aggregate[name], name


# ---------------------------------------------------------------------------------------------------------------
# has_answer


@pytest.mark.parametrize("use_regex", [True, False])
def test_has_answer_cases(use_regex):
  if use_regex and metrics._regex is None:  # pylint: disable=protected-access
    pytest.skip("regex module not installed")
  m = metrics.AnswerMatcher(metrics.SimpleTokenizer(use_regex=use_regex))
  text = "The Eiffel Tower, built in 1889 by Gustave Eiffel, is in Paris (France). U.S.-made? No."
  assert m.has_answer(["eiffel tower"], text)                 # uncased
  assert m.has_answer(["1889"], text)
  assert m.has_answer(["Paris (France)"], text)               # punctuation is tokens too
  assert m.has_answer(["U.S."], text)
  assert not m.has_answer(["Eiff"], text)                     # whole tokens only
  assert not m.has_answer(["tower built"], text)              # contiguous: the comma is in between
  assert m.has_answer(["nothing", "gustave eiffel"], text)    # any answer
  assert not m.has_answer([""], text)
  composed = "Café Müller in São Paulo"
  decomposed = unicodedata.normalize("NFD", composed)
  assert m.has_answer(["café müller"], decomposed) and m.has_answer([decomposed], composed)  # NFD both sides
  assert m.has_answer(["東京"], "首都は 東京 です")
  assert not m.has_answer(["東"], "首都は東京です")  # one letter run: no sub-word matches


def test_tokenizer_fallback_agrees_with_regex():
  if metrics._regex is None:  # pylint: disable=protected-access
    pytest.skip("regex module not installed")
  texts = ["Hello, Wörld! café's 3.14 日本語", "a\tb\nc\u00a0d\u2003e", "x\u200by", "e\u0301t\u00e9 — «ok» №5 ½ ©2024",
           "emoji 👍🏽 test", "ﬁnance Ⅻ ², ٣ arabic-indic"]
  rx, fb = metrics.SimpleTokenizer(True), metrics.SimpleTokenizer(False)
  for t in texts:
    t = metrics.normalize(t)
    assert rx.tokenize(t) == fb.tokenize(t), t


def test_answer_hits():
  texts = {"a": "Paris is the capital of France", "b": "Berlin is in Germany", "c": "The capital is Paris"}
  run = {"q1": ["b", "a", "c"], "q2": ["b"], "q3": ["a"]}
  answers = {"q1": ["Paris"], "q2": ["Madrid"], "q3": []}
  r = metrics.answer_hits(run, answers, texts.__getitem__, query_ids=["q1", "q2", "q3", "q4"], cutoffs=(1, 2))
  assert r.per_query["q1"] == {"AnswerHits@1": 0.0, "AnswerHits@2": 1.0, "AnswerMRR@10": 0.5}
  assert r.per_query["q2"]["AnswerHits@2"] == 0.0
  assert r.report == {"queries_requested": 4, "queries_evaluated": 2, "queries_without_answers": 2,
                      "queries_without_results": 0}
  assert r.aggregate == {"AnswerHits@1": 0.0, "AnswerHits@2": 0.5, "AnswerMRR@10": 0.25}
  assert metrics.has_answer(["capital of france"], texts["a"])
