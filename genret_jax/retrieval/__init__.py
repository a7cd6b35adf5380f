"""Retrieval: decoded identifiers -> ranked documents, IR metrics and run files.

* `docids.DocidLookup`: docid schemes, first-hit order without duplicates.
* `ngram_scoring.score_documents` / `NgramScoringConfig`: the n-gram scheme's document scoring.
* `metrics.evaluate_run` (Recall@k, Hits@k, MRR@10, nDCG@10 via ir-measures), `metrics.answer_hits` (DPR
  has_answer).
* `run_files.ResultsStore` / `process_batches`: resumable JSONL results, TREC run file, metrics JSON.
* `run.retrieve_batch` / `run.finalize`: the host half of `genret retrieve`.

See docs/retrieval.md.
"""
