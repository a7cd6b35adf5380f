"""Retrieval metrics: qrels-based IR measures through ir-measures, and NQ-style answer-string hits.

qrels-based (`evaluate_run`), computed by ir-measures (pytrec_eval underneath):

* `Recall@k`: trec_eval recall, |relevant in top k| / |relevant|.
* `Hits@k`: 1 if any relevant document is in the top k (ir-measures `Success@k`). This is what the generative
  retrieval papers, the reference's RIPOR evaluation included, call "Recall@k".
* `MRR@10` (`RR@10`) and `nDCG@10` (graded gains, trec_eval's `ndcg_cut`).

The ranking evaluated is exactly the given order: scores handed to ir-measures are derived from ranks, so ties in
the system's own scores cannot be reordered by trec_eval's tie-breaking. Averages are over every query asked for
that has at least one relevant document; a query with no results scores 0 (trec_eval would silently leave it
out). Queries without a relevant document, or without judgments, are counted in the report.

Answer-based (`answer_hits`), for question/answer data (NQ, TriviaQA): DPR's `has_answer` -- text and answers
NFD-normalised, tokenised with DPR's SimpleTokenizer (regex `([\\p{L}\\p{N}\\p{M}]+)|([^\\p{Z}\\p{C}])`), uncased, and
a hit is an exact contiguous token subsequence. `AnswerHits@k` is the fraction of questions with a hit in the top k,
over the questions evaluated (each query id once); `AnswerMRR@10` is the mean reciprocal first-hit rank.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from genret_jax.errors import InputError

DEFAULT_CUTOFFS = (1, 5, 10, 20, 100)
DEFAULT_ANSWER_CUTOFFS = (1, 5, 10, 20, 100)

try:  # The `regex` module is a declared dependency; the fallback keeps has_answer usable without it.
  import regex as _regex
except ImportError:  # pragma: no cover - exercised by tests through `SimpleTokenizer(use_regex=False)`
  _regex = None


@dataclasses.dataclass
class RunMetrics:
  """Aggregate metrics, per-query values and a report of what was evaluated."""

  aggregate: dict[str, float]
  per_query: dict[str, dict[str, float]]
  report: dict[str, int]


def measure_names(cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> list[str]:
  return ([f"Recall@{k}" for k in cutoffs] + [f"Hits@{k}" for k in cutoffs] + ["MRR@10", "nDCG@10"])


def _ir_measures(cutoffs: Sequence[int], min_grade: int):
  import ir_measures  # pylint: disable=g-import-not-at-top
  from ir_measures import R, RR, Success, nDCG  # pylint: disable=g-import-not-at-top
  ours = {}
  for k in cutoffs:
    ours[R(rel=min_grade) @ k] = f"Recall@{k}"
    ours[Success(rel=min_grade) @ k] = f"Hits@{k}"
  ours[RR(rel=min_grade) @ 10] = "MRR@10"
  ours[nDCG @ 10] = "nDCG@10"
  return ir_measures, ours


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
                 query_ids: Iterable[str] | None = None, cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
                 min_grade: int = 1) -> RunMetrics:
  """Evaluates ranked document ids against graded judgments.

  Args:
    run: query id -> document ids, best first (duplicates are an error: they would inflate recall).
    qrels: query id -> document id -> grade; grade >= min_grade is relevant.
    query_ids: queries to average over (default: those in `run`); a query missing from `run` scores 0.
    cutoffs: k for Recall@k and Hits@k.
    min_grade: smallest relevant grade.
  """
  ir_measures, ours = _ir_measures(cutoffs, min_grade)
  qids = list(dict.fromkeys(run if query_ids is None else query_ids))
  report = dict(queries_requested=len(qids), queries_evaluated=0, queries_without_judgments=0,
                queries_without_relevant=0, queries_without_results=0)
  evaluated = []
  for q in qids:
    judged = qrels.get(q)
    if not judged:
      report["queries_without_judgments"] += 1
    elif not any(g >= min_grade for g in judged.values()):
      report["queries_without_relevant"] += 1
    else:
      evaluated.append(q)
  report["queries_evaluated"] = len(evaluated)
  sub_run, sub_qrels = {}, {}
  for q in evaluated:
    ranked = list(run.get(q, ()))
    if len(set(ranked)) != len(ranked):
      raise InputError(f"query {q}: the ranking lists a document twice", key="run")
    if not ranked:
      report["queries_without_results"] += 1
      continue
    sub_run[q] = {d: float(len(ranked) - i) for i, d in enumerate(ranked)}
    sub_qrels[q] = {d: int(g) for d, g in qrels[q].items()}
  per_query = {q: {name: 0.0 for name in ours.values()} for q in evaluated}
  if sub_run:
    for m in ir_measures.iter_calc(list(ours), sub_qrels, sub_run):
      per_query[m.query_id][ours[m.measure]] = float(m.value)
  names = measure_names(cutoffs)
  aggregate = {n: (float(np.mean([per_query[q][n] for q in evaluated])) if evaluated else 0.0) for n in names}
  return RunMetrics(aggregate, per_query, report)


# ---------------------------------------------------------------------------------------------------------------
# DPR answer matching.


def _char_class(ch: str) -> str:
  """'w' for letters/numbers/marks, 's' for separators/control/unassigned, 'o' for any other visible char."""
  cat = unicodedata.category(ch)[0]
  if cat in "LNM":
    return "w"
  if cat in "ZC":
    return "s"
  return "o"


class SimpleTokenizer:
  """DPR's SimpleTokenizer word split, uncased.

  With the `regex` module it runs DPR's own pattern. Without it, the same split is emulated from
  `unicodedata` categories: a maximal run of L/N/M characters is one token, every other character outside Z/C is
  a one-character token. The two agree except where the regex module's and Python's Unicode databases differ in
  version.
  """

  PATTERN = r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])"

  def __init__(self, use_regex: bool | None = None):
    self.use_regex = (_regex is not None) if use_regex is None else use_regex
    if self.use_regex:
      if _regex is None:
        raise InputError("the `regex` module is not installed", key="use_regex")
      self._pattern = _regex.compile(self.PATTERN, flags=_regex.IGNORECASE + _regex.UNICODE + _regex.MULTILINE)

  def tokenize(self, text: str) -> list[str]:
    if self.use_regex:
      return [m.group().lower() for m in self._pattern.finditer(text)]
    tokens, run = [], []
    for ch in text:
      cls = _char_class(ch)
      if cls == "w":
        run.append(ch)
        continue
      if run:
        tokens.append("".join(run).lower())
        run = []
      if cls == "o":
        tokens.append(ch.lower())
    if run:
      tokens.append("".join(run).lower())
    return tokens


def normalize(text: str) -> str:
  return unicodedata.normalize("NFD", text)


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
  n = len(needle)
  if not n:
    return False
  first = needle[0]
  return any(haystack[i] == first and list(haystack[i:i + n]) == list(needle)
             for i in range(len(haystack) - n + 1))


class AnswerMatcher:
  """DPR `has_answer` with the tokenizer compiled once and document tokens cached (queries share documents)."""

  def __init__(self, tokenizer: SimpleTokenizer | None = None, cache_size: int = 200_000):
    self.tokenizer = tokenizer or SimpleTokenizer()
    self._cache: dict[str, list[str]] = {}
    self._cache_size = cache_size

  def tokens(self, text: str) -> list[str]:
    return self.tokenizer.tokenize(normalize(text))

  def doc_tokens(self, key: str, text: str) -> list[str]:
    toks = self._cache.get(key)
    if toks is None:
      toks = self.tokens(text)
      if len(self._cache) >= self._cache_size:
        self._cache.clear()
      self._cache[key] = toks
    return toks

  def has_answer(self, answers: Sequence[str], text: str, cache_key: str | None = None) -> bool:
    toks = self.tokens(text) if cache_key is None else self.doc_tokens(cache_key, text)
    return any(_contains(toks, self.tokens(a)) for a in answers)


def has_answer(answers: Sequence[str], text: str) -> bool:
  """DPR `has_answer` (string mode): any answer's tokens occur contiguously in the text's tokens."""
  return AnswerMatcher().has_answer(answers, text)


def answer_hits(run: Mapping[str, Sequence[str]], answers: Mapping[str, Sequence[str]],
                doc_text: Callable[[str], str], query_ids: Iterable[str] | None = None,
                cutoffs: Sequence[int] = DEFAULT_ANSWER_CUTOFFS, matcher: AnswerMatcher | None = None
                ) -> RunMetrics:
  """NQ-style answer-string Hits@k.

  Args:
    run: query id -> document ids, best first.
    answers: query id -> answer strings.
    doc_text: document id -> the text to search, DPR style `title + " " + text` (the body only: no pseudo-queries
      or other identifier material, unlike the reference's T5 outputs).
    query_ids: queries to average over (default: those in `run`); a query missing from `run` scores 0.
    cutoffs: k for AnswerHits@k.
    matcher: reuse one to share its document-token cache across calls.
  """
  matcher = matcher or AnswerMatcher()
  qids = list(dict.fromkeys(run if query_ids is None else query_ids))
  report = dict(queries_requested=len(qids), queries_evaluated=0, queries_without_answers=0,
                queries_without_results=0)
  max_k = max(max(cutoffs), 10)
  per_query = {}
  for q in qids:
    ans = [a for a in answers.get(q, ()) if a and a.strip()]
    if not ans:
      report["queries_without_answers"] += 1
      continue
    ranked = list(run.get(q, ()))[:max_k]
    if not ranked:
      report["queries_without_results"] += 1
    first = next((i for i, d in enumerate(ranked) if matcher.has_answer(ans, doc_text(d), cache_key=d)), None)
    row = {f"AnswerHits@{k}": float(first is not None and first < k) for k in cutoffs}
    row["AnswerMRR@10"] = 1.0 / (first + 1) if first is not None and first < 10 else 0.0
    per_query[q] = row
  report["queries_evaluated"] = len(per_query)
  names = [f"AnswerHits@{k}" for k in cutoffs] + ["AnswerMRR@10"]
  aggregate = {n: (float(np.mean([r[n] for r in per_query.values()])) if per_query else 0.0) for n in names}
  return RunMetrics(aggregate, per_query, report)
