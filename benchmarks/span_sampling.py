"""Span sampling (the n-gram identifiers of CGL's (query, document) pairs): ours vs the reference's way.

  .venv/bin/python benchmarks/span_sampling.py [--queries 10] [--negatives 100] [--repeats 3] [--write_docs]

Workload: Cranfield's first `--queries` judged queries, each with its positives and `--negatives` negatives drawn
by `cgl.sample_negatives` (seed 3): every (query, document) pair's 10 query-biased body spans, as a CGL
evaluation builds them (SLGR_BEHAVIOUR.md §1.4).

* reference way: the same selection rule with Python's `difflib.SequenceMatcher` (what the reference's
  fuzzywuzzy 0.18 runs without python-Levenshtein), one pair after another in one process;
* ours, one process: `identifiers.spans` as shipped (cydifflib: the same algorithm compiled);
* ours, workers: `spans.extract_spans_many` over `spans.default_workers` spawned processes (this host's cores),
  process start-up included in every call.
The three return the same spans (checked) and are timed round-robin, one call each per round; ratios are
medians of per-round ratios. With --write_docs the table replaces the "## Span sampling" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import statistics
import sys
import time

from _common import cpu_model, python_command, write_section

from genret_jax import corpora
from genret_jax.identifiers import spans
from genret_jax.scaling import cgl, cgl_eval

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("GENRET_SHARED_DATA", ROOT.parent / "shared" / "data"))
DOC_PATH = ROOT / "docs" / "benchmarks.md"
SECTION = "## Span sampling"
SPAN_KW = dict(n_samples=10, min_length=10, max_length=10, temperature=1.0)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--queries", type=int, default=10)
  p.add_argument("--negatives", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--write_docs", action="store_true")
  return p.parse_args(argv)


def workload(n_queries: int, n_negatives: int) -> list[tuple[str, str, int]]:
  coll = corpora.load(str(DATA / "cranfield"))
  queries, positives, _ = cgl_eval.query_positives(coll, coll.queries)
  queries, positives = queries[:n_queries], positives[:n_queries]
  neg = cgl.sample_negatives(len(coll.documents), positives, n=n_negatives, seed=3)
  # Each passage as its text, split where the job runs, as `NgramScheme.retrieval_targets_many` hands it over.
  return [(q.text, coll.documents[d].text, d) for q, pos, negs in zip(queries, positives, neg.negatives)
          for d in [*pos, *(int(x) for x in negs)]]


def reference_way(jobs):
  compiled = spans._difflib   # pylint: disable=protected-access
  spans._difflib = difflib    # pylint: disable=protected-access
  try:
    return spans.extract_spans_many(jobs, 0, workers=1, **SPAN_KW)
  finally:
    spans._difflib = compiled  # pylint: disable=protected-access


def main(argv=None) -> int:
  args = parse_args(argv)
  jobs = workload(args.queries, args.negatives)
  workers = spans.default_workers(len(jobs))
  methods = {
      "reference": lambda: reference_way(jobs),
      "ours_one_process": lambda: spans.extract_spans_many(jobs, 0, workers=1, **SPAN_KW),
      "ours_workers": lambda: spans.extract_spans_many(jobs, 0, workers=workers, **SPAN_KW),
  }
  load_start = os.getloadavg()
  results = {name: fn() for name, fn in methods.items()}   # warm-up, and the outputs must agree
  if not results["reference"] == results["ours_one_process"] == results["ours_workers"]:
    raise SystemExit("the three ways returned different spans")
  seconds = {name: [] for name in methods}
  for _ in range(args.repeats):
    for name, fn in methods.items():
      t = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - t)
      print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
  ratio = lambda slow, fast: statistics.median(s / f for s, f in zip(seconds[slow], seconds[fast]))
  rate = lambda name: len(jobs) / statistics.median(seconds[name])
  load_end = os.getloadavg()
  cmd = " ".join([python_command(), "benchmarks/span_sampling.py", *(argv if argv is not None else sys.argv[1:])])
  body = "\n".join([
      f"Command: `{cmd}`  ",
      f"Machine: {cpu_model()}, {os.cpu_count()} cores; ours over {workers} worker processes "
      f"(`spans.default_workers`); load average at start / end: {' '.join(f'{x:.2f}' for x in load_start)} / "
      f"{' '.join(f'{x:.2f}' for x in load_end)}.  ",
      f"Workload: {args.queries} Cranfield queries x (positives + {args.negatives} negatives) = {len(jobs):,} "
      "(query, document) pairs, 10 spans each; the three ways return the same spans (checked). Median over "
      f"{args.repeats} round-robin rounds (one call of each per round, worker start-up included); ratios are "
      "medians of per-round ratios.",
      "",
      "| way | pairs/s | ms per pair | vs reference |",
      "|---|---|---|---|",
      *(f"| {label} | {rate(name):.1f} | {1e3 / rate(name):.1f} | {ratio('reference', name):.2f}x |"
        for name, label in (("reference", "reference (difflib, one process)"),
                            ("ours_one_process", "ours, one process (cydifflib)"),
                            ("ours_workers", f"ours, {workers} worker processes"))),
  ])
  print(body)
  if args.write_docs:
    write_section(str(DOC_PATH), SECTION, body)
  return 0


if __name__ == "__main__":
  sys.exit(main())
