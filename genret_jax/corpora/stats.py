"""Summary statistics of a collection: what `genret inspect` prints, also useful in logs and reports."""

from __future__ import annotations

import collections
from typing import Any

from genret_jax.corpora.builder import flag_counts
from genret_jax.corpora.types import Collection


def summarize(collection: Collection) -> dict[str, Any]:
  """A JSON-serialisable summary: counts of documents, queries per split, judgments per grade, tokens."""
  docs = collection.documents
  flags = flag_counts(docs, collection.queries, collection.qrels)
  title_tokens = [len(d.title.split()) for d in docs]
  text_tokens = [len(d.text.split()) for d in docs]
  doc_tokens = [a + b for a, b in zip(title_tokens, text_tokens)]

  per_split: dict[str, int] = collections.Counter()
  judged_per_split: dict[str, int] = collections.Counter()
  qrels_per_split: dict[str, int] = collections.Counter()
  for q in collection.queries:
    per_split[q.split] += 1
    judgments = collection.qrels.get(q.query_id, {})
    if judgments:
      judged_per_split[q.split] += 1
      qrels_per_split[q.split] += len(judgments)
  grades = collections.Counter(g for j in collection.qrels.values() for g in j.values())
  query_tokens = [len(q.text.split()) for q in collection.queries]
  n = len(docs)
  return {
      "name": collection.name,
      "source": collection.source,
      "documents": n,
      "empty_documents": flags["empty_documents"],
      "empty_text": flags["empty_text"],
      "queries": len(collection.queries),
      "queries_per_split": dict(sorted(per_split.items())),
      "judged_queries": sum(judged_per_split.values()),
      "judged_queries_per_split": dict(sorted(judged_per_split.items())),
      "unjudged_queries": flags["unjudged_queries"],
      "queries_with_answers": sum(1 for q in collection.queries if q.answers),
      "qrels": sum(grades.values()),
      "qrels_per_grade": {str(g): c for g, c in sorted(grades.items())},
      "qrels_per_split": dict(sorted(qrels_per_split.items())),
      "relevant_qrels": sum(c for g, c in grades.items() if g > 0),
      "tokens": {
          "total": sum(doc_tokens),
          "mean_per_doc": round(sum(doc_tokens) / n, 2) if n else 0.0,
          "max_per_doc": max(doc_tokens, default=0),
          "title_total": sum(title_tokens),
          "text_total": sum(text_tokens),
          "query_mean": round(sum(query_tokens) / len(query_tokens), 2) if query_tokens else 0.0,
      },
      "report": dict(sorted(collection.report.items())),
  }
