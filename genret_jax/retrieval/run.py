"""The host half of `genret retrieve`: beam-search outputs -> ranked documents -> run files and metrics.

The model half (checkpoint, seqio inputs, `decoding.beam_search` under the mesh) produces, per query batch, a
`BeamSearchOutput`; `retrieve_batch` turns it into `QueryResult`s with either scheme family:

* docid schemes (atomic, naive, semantic, codebook, title): the finished hypotheses, looked up in a
  `DocidLookup` (first-hit order, duplicates removed);
* the n-gram scheme: the n-gram history (`keep_history=True`), scored against the corpus index with
  `ngram_scoring.score_documents`.

`finalize` then writes `run.trec` and `metrics.json` from the job's `ResultsStore`. Only numpy is needed here
(beam outputs may hold jax or numpy arrays), so this part runs and is tested without a model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from genret_jax import filesystem, multihost
from genret_jax.errors import InputError, check_int
from genret_jax.retrieval import metrics as metrics_lib
from genret_jax.retrieval.docids import DocidLookup
from genret_jax.retrieval.ngram_scoring import NgramIndex, NgramScoringConfig
from genret_jax.retrieval.ranking_pool import score_query
from genret_jax.retrieval.run_files import QueryResult, ResultsStore


def _host(x) -> np.ndarray:
  return np.asarray(x)


def host_hypotheses(out: Any) -> list[tuple[list[tuple[int, ...]], list[float]]]:
  """Per query: (identifier token tuples, scores) of the valid results, best first."""
  tokens, lengths, scores, valid = (_host(x) for x in (out.tokens, out.lengths, out.scores, out.valid))
  res = []
  for q in range(tokens.shape[0]):
    rows = np.flatnonzero(valid[q])
    res.append(([tuple(int(t) for t in tokens[q, j, :lengths[q, j]]) for j in rows],
                [float(scores[q, j]) for j in rows]))
  return res


def host_history(out: Any) -> list[tuple[list[tuple[int, ...]], list[float], list[int]]]:
  """Per query: (n-grams, cumulative log-probs, corpus counts) of the valid history entries."""
  h = getattr(out, "history", None)
  if h is None:
    raise InputError("the n-gram scheme needs beam search outputs with keep_history=True", key="keep_history")
  tokens, lengths, logp, counts, valid = (_host(x) for x in (h.tokens, h.lengths, h.log_probs, h.counts, h.valid))
  res = []
  for q in range(tokens.shape[0]):
    rows = np.flatnonzero(valid[q])
    res.append(([tuple(int(t) for t in tokens[q, j, :lengths[q, j]]) for j in rows],
                [float(logp[q, j]) for j in rows], [int(counts[q, j]) for j in rows]))
  return res


def retrieve_batch(beam_outputs: Any, query_ids: Sequence[str], doc_ids: Sequence[str], *,
                   lookup: DocidLookup | None = None, index: NgramIndex | None = None,
                   cfg: NgramScoringConfig | None = None, k: int = 100,
                   keep_identifiers: bool = True, rows: Sequence[int] | None = None,
                   pool=None) -> list[QueryResult]:
  """Turns one batch of beam-search outputs into ranked documents.

  Args:
    beam_outputs: `decoding.BeamSearchOutput` (or anything with the same array fields) for len(query_ids)
      queries; padded rows beyond len(query_ids) (a short last batch) are ignored.
    query_ids: the batch's query ids.
    doc_ids: canonical document index -> document id string.
    lookup: identifier table, for docid schemes. Exactly one of `lookup` and `index` is given.
    index: corpus index, for the n-gram scheme.
    cfg: n-gram scoring parameters (n-gram scheme; `cfg.hits` bounds the documents returned).
    k: documents kept per query (docid schemes).
    keep_identifiers: store the decoded identifiers (docid) or the scoring stats (n-gram) with each result.
    rows: the batch rows `query_ids` belong to (default 0, 1, ...): a multi-host job ranks a share on each host.
    pool: a `ranking_pool.RankingPool` to score the n-gram scheme's queries on several cores (same results).
  """
  if (lookup is None) == (index is None):
    raise InputError("give exactly one of a docid lookup table or an n-gram index", key="scheme")
  results = []
  if lookup is not None:
    per_query = _rows(host_hypotheses(beam_outputs), query_ids, rows)
    for qid, (hyps, scores) in zip(query_ids, per_query):
      ranking = lookup.rank(hyps, scores, k=k)
      extra = dict(num_invalid=ranking.num_invalid, num_duplicates=ranking.num_duplicates)
      if keep_identifiers:
        extra["identifiers"] = [list(h) for h in hyps]
      results.append(QueryResult(str(qid), [doc_ids[d] for d in ranking.doc_indices.tolist()],
                                 ranking.scores.tolist(), extra))
    return results
  cfg = cfg or NgramScoringConfig()
  per_query = _rows(host_history(beam_outputs), query_ids, rows)
  if pool is not None:
    scored = pool.score(per_query)
  else:
    scored = [score_query(*q, index=index, cfg=cfg) for q in per_query]
  for qid, (doc_indices, scores, stats) in zip(query_ids, scored):
    extra = dict(stats=stats) if keep_identifiers else {}
    results.append(QueryResult(str(qid), [doc_ids[d] for d in doc_indices.tolist()], scores.tolist(), extra))
  return results


def _rows(per_query: list, query_ids: Sequence[str], rows: Sequence[int] | None) -> list:
  rows = range(len(query_ids)) if rows is None else list(rows)
  if len(rows) != len(query_ids) or (len(rows) and max(rows) >= len(per_query)):
    raise InputError(f"{len(per_query)} beam outputs for {len(query_ids)} queries at rows {list(rows)[:8]}",
                     key="beam_outputs")
  return [per_query[r] for r in rows]


def compute_metrics(results: Sequence[QueryResult], qrels: Mapping[str, Mapping[str, int]] | None = None,
                    answers: Mapping[str, Sequence[str]] | None = None, doc_text=None,
                    query_ids: Sequence[str] | None = None,
                    cutoffs: Sequence[int] = metrics_lib.DEFAULT_CUTOFFS) -> dict[str, Any]:
  """Metrics JSON for a finished job: qrels-based measures and/or answer hits, with their reports.

  Args:
    results: all query results of the job.
    qrels: graded judgments (omit for answer-only data).
    answers: query id -> answer strings (NQ-style data); needs `doc_text`.
    doc_text: document id -> text for answer matching.
    query_ids: queries to average over (default: those in `results`).
    cutoffs: k for Recall@k / Hits@k / AnswerHits@k.
  """
  run = {r.query_id: list(r.doc_ids) for r in results}
  qids = list(query_ids) if query_ids is not None else list(run)
  out: dict[str, Any] = {"num_queries": len(qids), "metrics": {}, "report": {}}
  if qrels:
    m = metrics_lib.evaluate_run(run, qrels, query_ids=qids, cutoffs=cutoffs)
    out["metrics"].update(m.aggregate)
    out["report"]["qrels"] = m.report
  if answers:
    if doc_text is None:
      raise InputError("answer matching needs the document texts", key="doc_text")
    m = metrics_lib.answer_hits(run, answers, doc_text, query_ids=qids, cutoffs=cutoffs)
    out["metrics"].update(m.aggregate)
    out["report"]["answers"] = m.report
  empty = sum(1 for r in results if not r.doc_ids)
  out["report"]["queries_with_no_documents"] = empty
  return out


def finalize(store: ResultsStore, tag: str = "genret", report: Mapping[str, Any] | None = None,
             **metric_kwargs) -> dict[str, Any]:
  """Writes `run.trec` and `metrics.json` from a job's stored results (merging an object store's per-batch parts
  first); returns the metrics JSON. `report` entries join the metrics JSON's report."""
  store.consolidate()
  results = store.results()
  store.write_run(tag)
  out = compute_metrics(results, **metric_kwargs)
  out["report"].update(report or {})
  out["store"] = dict(store.report)
  store.write_metrics(out)
  return out


# ---- `genret retrieve` ------------------------------------------------------------------------------------------

import gin  # noqa: E402  (the command part only)


@gin.configurable(module="genret")
def retrieve_run(*, checkpoint_path: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
                 split: str = "test", beam_size: int = 20, output_dir: str | None = None,
                 task_feature_lengths: Mapping[str, int] | None = None, batch_size: int = 32,
                 max_queries: int | None = None, mesh_data: int = -1, mesh_fsdp: int = 1, mesh_model: int = 1,
                 index_shards: int = 1, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Loads the checkpoint, runs the constrained beam search over the split's queries in batches (resumable:
  batches already written are skipped), then writes run.trec, results.jsonl and metrics.json. `index_shards`
  splits an n-gram scheme's suffix array into that many device shards, placed over the mesh's `model` axis
  when `mesh_model` divides them. The constraint is cached in the task's artefact directory
  (`retrieval_index_v<vocab size>`, see `retrieval.scheme_index`): later jobs load it. On several processes
  (jax.distributed) every process decodes every batch and process 0 alone writes the output directory."""
  import dataclasses
  import logging
  import os

  import jax

  import tasks  # noqa: F401  (registers the tasks)
  from genret_jax.models import model_api, params_io, partitioning
  from genret_jax.retrieval.pipeline import RetrievalConfig, Retriever
  from genret_jax.retrieval.run_files import process_batches
  from genret_jax.retrieval.scheme_index import cached_scheme_index
  from genret_jax.scaling.cgl_command import _retrieval_task

  # Named as the user set them, and before the checkpoint loads (minutes for a large model on a pod).
  check_int(beam_size, "BEAM_SIZE")
  check_int(batch_size, "INFER_BATCH_SIZE")
  if max_queries is not None:   # 0 ran every query and -1 all but the last one
    check_int(max_queries, "genret.retrieve_run.max_queries")
  task = _retrieval_task(mixture_or_task_name)
  artefacts = tasks.artefacts_for(task.name)
  splits = artefacts.query_splits()
  if split not in splits:
    raise InputError(f"split {split!r} has no queries; available: {sorted(splits)}", key="SPLIT")
  if not splits[split]:   # a small corpus's seeded split can be empty: the job wrote an empty run and "succeeded"
    raise InputError(f"split {split!r} of {artefacts.collection().name!r} is empty; non-empty: "
                     f"{sorted(k for k, v in splits.items() if v)}", key="SPLIT")
  queries = list(splits[split])[:max_queries] if max_queries else list(splits[split])
  collection = artefacts.collection()
  model = model_api.get_model()
  mesh = partitioning.make_mesh(mesh_data, mesh_fsdp, mesh_model)
  vocab = task.output_features["targets"].vocabulary
  params_io.check_vocabulary(checkpoint_path, vocab)
  params = params_io.restore_params(checkpoint_path, params_io.abstract_with_shardings(model, mesh))
  lengths = dict(task_feature_lengths or {"inputs": 64})
  # The task's query prefix, as the model was trained with it (a RetrievalConfig.query_prefix binding otherwise).
  prefix = {"query_prefix": artefacts.query_prefix} if artefacts.query_prefix else {}
  cfg = RetrievalConfig(beam_size=beam_size, batch_size=batch_size, inputs_length=lengths["inputs"],
                        index_shards=index_shards, **prefix)
  scheme_index = cached_scheme_index(artefacts, vocab, model.config.vocab_size, index_shards)
  retriever = Retriever(model, params, artefacts.identifier_scheme(), vocab, collection, cfg, mesh=mesh,
                        scheme_index=scheme_index)
  output_dir = output_dir or os.path.join(checkpoint_path, f"retrieve_{split}_beam{beam_size}")
  # Everything that changes the results: a restart with any of it changed must not append to these batches.
  meta = {"checkpoint_path": filesystem.abspath(checkpoint_path), "task": task.name, "split": split,
          "beam_size": beam_size, "batch_size": batch_size, "num_queries": len(queries),
          "params": params_io.params_fingerprint(checkpoint_path), "task_feature_lengths": lengths,
          # ranking_workers only spreads the same computation over processes: a restart may change it.
          "retrieval_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ranking_workers"},
          "scoring_config": dataclasses.asdict(retriever.scoring)}
  # Trimmed like the training inputs (seqio), but a researcher should know how many queries lost their tail.
  too_long = retriever.too_long(queries)
  if too_long:
    logging.warning("%d of %d queries are longer than TASK_FEATURE_LENGTHS['inputs'] = %d tokens (EOS "
                    "included) and were cut to it, as training cut them; e.g. %s", len(too_long), len(queries),
                    lengths["inputs"], too_long[:5])
  batches = list(retriever.batches(queries))
  _check_processes_agree(meta, queries)
  store, done = _open_output(output_dir, meta, overwrite, [[q.query_id for q in b[1]] for b in batches])

  nproc, me = jax.process_count(), jax.process_index()
  ranked_here = [0]

  def compute(b: int):
    _, chunk, inputs, mask = batches[b]
    # Every process holds every decoded row and ranks every nproc-th query (`Retriever.rank_shared`).
    results = retriever.rank_shared(retriever.decode(inputs, mask, beam_size), chunk)
    ranked_here[0] += len(range(me, len(chunk), nproc))
    return results if store is not None else []   # not process 0: process 0 writes the rows

  try:
    counts = process_batches(store if store is not None else _DecodeOnly(done), range(len(batches)), compute,
                             progress=progress and store is not None, desc=f"retrieve beam={beam_size}")
  finally:
    retriever.close()
  truncated = {"queries_truncated": len(too_long), "inputs_length": lengths["inputs"],
               "truncated_query_ids": too_long[:100]}
  if store is None:
    return {"metrics": {}, "report": {"inputs": truncated, **counts}, "output_dir": filesystem.abspath(output_dir),
            "written_by_process": 0, "queries_ranked_here": ranked_here[0]}
  qrels = {q.query_id: collection.qrels.get(q.query_id, {}) for q in queries}
  answers = {q.query_id: list(q.answers) for q in queries if q.answers} or None

  def doc_text(doc_id: str) -> str:   # DPR style, for answer-string Hits@k
    d = collection.documents[collection.doc_index(doc_id)]
    return f"{d.title} {d.text}".strip()

  out = finalize(store, tag=f"genret-{task.name}-beam{beam_size}", qrels=qrels if any(qrels.values()) else None,
                 answers=answers, doc_text=doc_text if answers else None, query_ids=[q.query_id for q in queries],
                 report={"inputs": truncated})
  out["output_dir"] = filesystem.abspath(output_dir)
  return out


class _DecodeOnly:
  """What processes other than 0 hold in place of the `ResultsStore`: process 0's finished batches, so that they
  decode exactly the batches it decodes (each decode is a collective), and no writes."""

  def __init__(self, done: set[int]):
    self.completed_batches = set(done)

  def write_batch(self, batch: int, results) -> None:
    del batch, results


def _check_processes_agree(meta: Mapping[str, Any], queries) -> None:
  """Refuses, on every process at once, a multi-host job whose processes see different jobs (another config, or
  a host whose GENRET_CACHE artefacts split the queries differently): they would decode different numbers of
  batches and wait for each other forever, or write rows of queries that process 0 does not hold."""
  import json

  def job() -> str:
    return json.dumps(meta, sort_keys=True) + "".join(f"\n{q.query_id}\t{q.text}" for q in queries)

  multihost.agree(lambda: None, lambda _: job(), what="describing the job",
                  differ="see another job than process 0 (configuration, checkpoint or the split's queries "
                         "differ): give every host the same flags, gin files and GENRET_CACHE")


def _open_output(output_dir: str, meta: Mapping[str, Any], overwrite: bool,
                 batch_ids: Sequence[Sequence[str]]) -> tuple[ResultsStore | None, set[int]]:
  """(store, batches already written), for a job whose batch b holds the queries `batch_ids[b]`. Process 0
  alone opens the store (it alone recovers, truncates and appends; two processes appending to one results.jsonl
  wrote every row twice) and tells the others which batches it has, so that a restarted multi-host job skips the
  same batches on every host; they get None."""
  import jax
  num_batches = len(batch_ids)
  if jax.process_count() == 1:
    store = ResultsStore(output_dir, meta, overwrite=overwrite)
    store.check_queries(batch_ids)
    return store, store.completed_batches
  from jax.experimental import multihost_utils
  store, error = None, None
  flags = np.zeros(num_batches + 1, np.int32)   # [process 0 opened the store, then one per batch: written]
  if jax.process_index() == 0:
    try:
      store = ResultsStore(output_dir, meta, overwrite=overwrite)
      store.check_queries(batch_ids)
      flags[0] = 1
      flags[1 + np.array(sorted(b for b in store.completed_batches if b < num_batches), np.int64)] = 1
    except Exception as e:   # raised after the broadcast: the other processes must not wait for it forever
      error = e
  flags = np.asarray(multihost_utils.broadcast_one_to_all(flags))
  if error is not None:
    raise error
  if not flags[0]:
    raise InputError("process 0 could not open the output directory (its log says why)", path=output_dir)
  return store, {int(b) for b in np.flatnonzero(flags[1:])}


def build_task_index(mixture_or_task_name: str, vocab_size: int, index_shards: int = 1) -> dict[str, Any]:
  """`genret build-index --task`: builds (or finds) the retrieval constraint `genret retrieve` will load for this
  task and a model vocabulary of `vocab_size`; returns the report."""
  import tasks  # noqa: F401  (registers the tasks)
  from genret_jax.retrieval.scheme_index import cached_scheme_index
  from genret_jax.scaling.cgl_command import _retrieval_task
  try:
    task = _retrieval_task(mixture_or_task_name)
  except InputError as e:   # named by the option this command took it from
    raise InputError(e.message, key="build_index.task") from e
  artefacts = tasks.artefacts_for(task.name)
  si = cached_scheme_index(artefacts, task.output_features["targets"].vocabulary, vocab_size, index_shards)
  indexed = si.num_tokens   # suffix array: documents + separators; trie: identifier tokens + EOS
  return {"kind": "suffix_array" if si.ngram_index is not None else "trie", "task": task.name,
          "output_dir": artefacts.retrieval_index_dir(vocab_size), "source": si.source,
          "seconds": si.seconds, "num_docs": artefacts.identifier_scheme().num_docs, "index_shards": index_shards,
          "indexed_tokens": indexed, "nbytes": si.nbytes, "bytes_per_token": si.nbytes / max(indexed, 1),
          # On the accelerator (all shards; a placed sharded constraint holds S / mesh_model of them per device).
          "device_nbytes": int(si.constraint.nbytes),
          "device_bytes_per_token": si.constraint.nbytes / max(indexed, 1)}


def add_arguments(parser) -> None:
  from genret_jax import gin_utils
  from genret_jax.training import distributed
  gin_utils.add_gin_arguments(parser)
  distributed.add_arguments(parser)


def run(args) -> int:
  from genret_jax import gin_utils
  from genret_jax.training import distributed
  # Before anything touches the backend: a multi-GPU or multi-host job otherwise ran as one process per host.
  distributed.initialize_from_args(args)
  from genret_jax.models import model_api  # noqa: F401  (registers the model configurables)
  # Registers RetrievalConfig: `--gin.RetrievalConfig.hits=...` was "no configurable matching" in a fresh process.
  from genret_jax.retrieval import pipeline  # noqa: F401
  from genret_jax.scaling.cgl_command import _model_gin_file
  model_gin = _model_gin_file(args)
  gin_utils.parse_gin([model_gin, *args.gin_file], args.gin_bindings, args.gin_search_paths)
  out = retrieve_run()
  if "written_by_process" in out:
    import jax
    print(f"process {jax.process_index()} of {jax.process_count()}: decoded {out['report']['batches_computed']} "
          f"batches, ranked {out['queries_ranked_here']} queries; process {out['written_by_process']} wrote "
          f"{out['output_dir']}")
    return 0
  agg = out.get("metrics", {})
  shown = {k: round(float(v), 4) for k, v in agg.items()
           if k in ("Recall@10", "Hits@10", "MRR@10", "nDCG@10", "AnswerHits@10")}
  print(f"retrieved; metrics {shown or '(see metrics.json)'}; wrote {out['output_dir']}")
  return 0
