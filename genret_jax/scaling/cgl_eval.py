"""CGL of one model on one split of a collection: sequences built as the retrieval task builds them, scored in
batches (`scoring.PairScorer`), reduced by `cgl.cgl_from_identifier_nll`.

Per query q of the split (SLGR_BEHAVIOUR.md §5, with the reference's defects fixed):
* positives: every judged-relevant document (grade >= min_grade) of q, as in the qrels;
* negatives: `num_negatives` documents drawn by `cgl.sample_negatives(seed)` from the corpus minus q's positives
  (and minus documents that have no identifier at all); drawn once, saved, and reused for every model;
* the identifier sequences of (q, d): `scheme.retrieval_targets(q.text, d, seed)` — n-gram: the 10 query-biased
  body spans drawn by the per-(seed, query, document) generator, exactly the spans the retrieval task trains on
  for positives (sampled over worker processes, and saved with the task's artefacts so that later evaluations of
  the same pairs load them: `pair_identifiers`); docid schemes: [the docid];
* tokenisation shared with training: the task's vocabulary, the task's query prefix on the input, truncated to
  the feature lengths and EOS appended after trimming (seqio `append_eos_after_trim`).
Loss of (q, d) = total NLL / total tokens over its identifiers ("token" averaging, the reference's).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from genret_jax import atomic_files, filesystem, multihost
from genret_jax.corpora.types import Collection, Query
from genret_jax.errors import InputError
from genret_jax.identifiers.base import DocidScheme, IdentifierScheme
from genret_jax.identifiers.vocab import encode_batch
from genret_jax.scaling import cgl, scoring

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CGLSequences:
  """All (query, document, identifier) sequences of an evaluation, tokenised."""

  query_ids: tuple[str, ...]
  inputs: list[list[int]]                 # per query: input token ids (EOS-terminated)
  positives: list[list[int]]              # per query: positive document indices
  negatives: cgl.NegativeSet
  # Flat list of target rows and, per row, (query slot, document slot, identifier slot).
  targets: list[list[int]]
  row_query: np.ndarray                   # [R] query index
  row_doc_slot: np.ndarray                # [R] 0..P_q-1 = positives, P_q.. = negatives (in NegativeSet order)
  row_ident: np.ndarray                   # [R] identifier index within (q, d)
  max_identifiers: int
  skipped: dict[str, int]

  @property
  def num_sequences(self) -> int:
    return len(self.targets)


@dataclasses.dataclass(frozen=True)
class CGLEvaluation:
  result: cgl.CGLResult
  query_ids: tuple[str, ...]
  negatives: cgl.NegativeSet
  skipped: dict[str, int]
  scoring_stats: dict
  num_sequences: int


def tokenize(vocabulary, text: str, max_length: int | None) -> list[int]:
  """seqio `tokenize` + `append_eos_after_trim`: ids trimmed to max_length - 1, then EOS."""
  return tokenize_batch(vocabulary, [text], max_length)[0]


def tokenize_batch(vocabulary, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
  """`tokenize` of every text, encoded in batches (`identifiers.vocab.encode_batch`)."""
  keep = None if max_length is None else max(0, max_length - 1)
  eos = int(vocabulary.eos_id)
  return [[int(t) for t in ids[:keep]] + [eos] for ids in encode_batch(vocabulary, texts)]


def documents_without_identifiers(scheme: IdentifierScheme) -> list[int]:
  """Documents that cannot be scored (no identifier at all): never drawn as negatives."""
  if isinstance(scheme, DocidScheme):
    return []
  coll = scheme.collection
  return [i for i, d in enumerate(coll.documents) if not d.text.split() and not d.title.strip()]


def query_positives(collection: Collection, queries: Sequence[Query], min_grade: int = 1
                    ) -> tuple[list[Query], list[list[int]], dict[str, int]]:
  """Queries with at least one judged-relevant document in the corpus, and their positives (doc indices)."""
  kept, positives = [], []
  skipped = {"queries_without_positives": 0, "positives_not_in_corpus": 0}
  for q in queries:
    docs = []
    for d in collection.positives(q.query_id, min_grade):
      if collection.has_doc(d):
        docs.append(collection.doc_index(d))
      else:
        skipped["positives_not_in_corpus"] += 1
    if docs:
      kept.append(q)
      positives.append(sorted(set(docs)))
    else:
      skipped["queries_without_positives"] += 1
  return kept, positives, skipped


def load_or_sample_negatives(path: str | None, num_docs: int, positives: Sequence[Sequence[int]],
                             query_ids: Sequence[str], num_negatives: int, seed: int,
                             excluded: Sequence[int] = (), allow_fewer: bool = False) -> cgl.NegativeSet:
  """The negatives at `path` when it exists (checked against this evaluation), else sampled and saved there."""
  if path and filesystem.exists(path):
    neg = cgl.NegativeSet.load(path)
    if neg.num_docs != num_docs:
      raise InputError(f"negatives were drawn for {neg.num_docs} documents, the corpus has {num_docs}",
                       path=path, key="num_docs")
    if neg.query_ids is not None and tuple(neg.query_ids) != tuple(query_ids):
      raise InputError("negatives were drawn for other queries (query ids differ)", path=path, key="query_ids")
    if neg.num_queries != len(query_ids):
      raise InputError(f"negatives hold {neg.num_queries} queries, this evaluation has {len(query_ids)}",
                       path=path, key="negatives")
    # A changed seed or count was silently served the old set while the results recorded the new one.
    if neg.seed != seed:
      raise InputError(f"negatives were drawn with seed {neg.seed}, this evaluation asks for seed {seed}",
                       path=path, key="negatives_seed")
    if neg.num_negatives != num_negatives and not (allow_fewer and neg.num_negatives < num_negatives):
      raise InputError(f"negatives hold {neg.num_negatives} per query, this evaluation asks for {num_negatives}",
                       path=path, key="num_negatives")
    for i, p in enumerate(positives):
      if np.isin(neg.negatives[i], np.asarray(p, np.int64)).any():
        raise InputError(f"negatives of query {query_ids[i]!r} include one of its positives", path=path,
                         key="negatives")
    return neg
  excluded = sorted(set(int(x) for x in excluded))
  neg = cgl.sample_negatives(num_docs, [sorted(set(p) | set(excluded)) for p in positives], n=num_negatives,
                             seed=seed, query_ids=list(query_ids), allow_fewer=allow_fewer)
  if path:
    neg.save(path)
  return neg


def pair_identifiers(scheme: IdentifierScheme, pairs: Sequence[tuple[str, int]], seed: int, *,
                     workers: int | None = None, cache_dir: str | None = None) -> list[list[str]]:
  """`scheme.retrieval_targets_many(pairs, seed)`. The n-gram scheme's span sampling is most of a CGL evaluation's
  host time and does not depend on the model, so with `cache_dir` (a directory that belongs to this scheme: the
  task's artefacts) its result is saved there, named by a hash of (seed, pairs), and later evaluations of the same
  pairs load it. `workers`: processes for the sampling (None: as many as the host and the work suit)."""
  if not cache_dir or not scheme.is_ngram:
    return scheme.retrieval_targets_many(pairs, seed, workers=workers)
  key = hashlib.sha256(json.dumps([int(seed), [[q, int(d)] for q, d in pairs]]).encode()).hexdigest()[:20]
  path = os.path.join(cache_dir, f"cgl_targets_{key}.json.gz")
  if os.path.exists(path):
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        cached = json.load(f)
      if isinstance(cached, list) and len(cached) == len(pairs):
        logger.info("identifiers of %d (query, document) pairs loaded from %s", len(pairs), path)
        return cached
      logger.warning("%s does not hold a list of %d pairs' identifiers; sampling again", path, len(pairs))
    except (OSError, EOFError, ValueError) as e:
      logger.warning("cannot read %s (%s); sampling again", path, e)
  targets = scheme.retrieval_targets_many(pairs, seed, workers=workers)
  # On several processes every one samples the same spans (one generator per pair; `PairScorer.score` compares
  # what they score), and process 0 alone saves them: hosts need not share GENRET_CACHE.
  if jax.process_index() == 0:
    with atomic_files.atomic_open(path, "wt", opener=gzip.open) as f:
      json.dump(targets, f)
  return targets


def build_sequences(collection: Collection, scheme: IdentifierScheme, vocabulary, queries: Sequence[Query], *,
                    target_seed: int, num_negatives: int = cgl.DEFAULT_NUM_NEGATIVES, negatives_seed: int = 0,
                    negatives_path: str | None = None, input_length: int | None = None,
                    target_length: int | None = None, query_prefix: str = "", min_grade: int = 1,
                    allow_fewer_negatives: bool = False, targets_cache_dir: str | None = None) -> CGLSequences:
  """Every (query, document, identifier) sequence of the evaluation, tokenised like the retrieval task.
  `targets_cache_dir`: see `pair_identifiers`.

  On several processes (jax.distributed) each step below either runs on every process, and a failure on one
  stops them all, or (the negatives) on process 0 alone, which gives the others its result."""

  def queries_and_positives():
    kept, positives, skipped = query_positives(collection, queries, min_grade)
    if not kept:
      raise InputError(f"no query of the split has a judged-relevant document (grade >= {min_grade})",
                       path=collection.source or None)
    return kept, positives, skipped, documents_without_identifiers(scheme)

  kept, positives, skipped, excluded = multihost.agree(
      queries_and_positives,
      lambda r: json.dumps([[q.query_id for q in r[0]], r[1], r[3], len(collection.documents)]),
      what="finding the queries' positives", differ="see other queries, judgments or documents than process 0: "
      "give every host the same flags, gin files and GENRET_CACHE")
  skipped["documents_without_identifiers"] = len(excluded)
  query_ids = tuple(q.query_id for q in kept)
  # Process 0 alone reads the negatives file, or samples and writes it; the others use its negatives, whether or
  # not they see that file (a sweep's shared one, say, on process 0's disk only).
  negatives = multihost.from_process_0(
      lambda: load_or_sample_negatives(negatives_path, len(collection.documents), positives, query_ids,
                                       num_negatives, negatives_seed, excluded, allow_fewer_negatives),
      what="reading or sampling the negatives")
  return multihost.agree(
      lambda: _tokenised_sequences(collection, scheme, vocabulary, kept, positives, negatives, excluded, skipped,
                                   target_seed=target_seed, input_length=input_length,
                                   target_length=target_length, query_prefix=query_prefix,
                                   targets_cache_dir=targets_cache_dir),
      None, what="building the identifier sequences")


def _tokenised_sequences(collection: Collection, scheme: IdentifierScheme, vocabulary, kept: Sequence[Query],
                         positives: list[list[int]], negatives: cgl.NegativeSet, excluded: Sequence[int],
                         skipped: dict[str, int], *, target_seed: int, input_length: int | None,
                         target_length: int | None, query_prefix: str,
                         targets_cache_dir: str | None) -> CGLSequences:
  query_ids = tuple(q.query_id for q in kept)
  excluded_set = set(excluded)
  inputs = tokenize_batch(vocabulary, [query_prefix + q.text for q in kept], input_length)
  pairs, pair_slots = [], []
  skipped["positives_without_identifiers"] = 0
  for qi, q in enumerate(kept):
    docs = list(positives[qi]) + [int(d) for d in negatives.negatives[qi]]
    for slot, d in enumerate(docs):
      if d in excluded_set:
        if slot < len(positives[qi]):
          skipped["positives_without_identifiers"] += 1
          continue
        raise InputError(f"negative document {d} of query {q.query_id!r} has no identifier", key="negatives")
      pairs.append((q.text, d))
      pair_slots.append((qi, slot))
  pair_targets = pair_identifiers(scheme, pairs, target_seed, cache_dir=targets_cache_dir)
  texts, rq, rd, ri = [], [], [], []
  max_ids = 1
  for (qi, slot), idents in zip(pair_slots, pair_targets):
    max_ids = max(max_ids, len(idents))
    for j, t in enumerate(idents):
      texts.append(t)
      rq.append(qi)
      rd.append(slot)
      ri.append(j)
  unique = list(dict.fromkeys(texts))   # each distinct identifier tokenised once
  encoded = dict(zip(unique, tokenize_batch(vocabulary, unique, target_length)))
  targets = [encoded[t] for t in texts]
  return CGLSequences(query_ids, inputs, positives, negatives, targets, np.asarray(rq, np.int64),
                      np.asarray(rd, np.int64), np.asarray(ri, np.int64), max_ids, skipped)


def reduce_scores(seqs: CGLSequences, nll: np.ndarray, num_tokens: np.ndarray,
                  averaging: str = "token") -> cgl.CGLResult:
  """Per-row NLL sums and token counts -> `CGLResult` (absent identifiers have 0 tokens)."""
  nq, nn_ = len(seqs.query_ids), seqs.negatives.num_negatives
  t = seqs.max_identifiers
  npos = [len(p) for p in seqs.positives]
  pos_nll = [np.zeros((p, t)) for p in npos]
  pos_tok = [np.zeros((p, t)) for p in npos]
  neg_nll = np.zeros((nq, nn_, t))
  neg_tok = np.zeros((nq, nn_, t))
  for r in range(nll.size):
    q, s, j = seqs.row_query[r], seqs.row_doc_slot[r], seqs.row_ident[r]
    if s < npos[q]:
      pos_nll[q][s, j], pos_tok[q][s, j] = nll[r], num_tokens[r]
    else:
      neg_nll[q, s - npos[q], j], neg_tok[q, s - npos[q], j] = nll[r], num_tokens[r]
  # A positive without identifiers (skipped) has no row: drop it from its query's positives.
  pos_nll = [n[tk.sum(1) > 0] for n, tk in zip(pos_nll, pos_tok)]
  pos_tok = [tk[tk.sum(1) > 0] for tk in pos_tok]
  if any(tk.shape[0] == 0 for tk in pos_tok):
    raise InputError("a query has no positive with an identifier; cannot compute its CGL", key="positives")
  return cgl.cgl_from_identifier_nll(pos_nll, pos_tok, neg_nll, neg_tok, averaging)


def evaluate_cgl(model, params, collection: Collection, scheme: IdentifierScheme, vocabulary,
                 queries: Sequence[Query], *, target_seed: int, num_negatives: int = cgl.DEFAULT_NUM_NEGATIVES,
                 negatives_seed: int = 0, negatives_path: str | None = None, input_length: int | None = None,
                 target_length: int | None = None, query_prefix: str = "", min_grade: int = 1,
                 averaging: str = "token", mesh=None, batch_size: int = scoring.DEFAULT_BATCH_SIZE,
                 inputs_per_batch: int | None = None, share_inputs: bool = True,
                 allow_fewer_negatives: bool = False, length_buckets: Sequence[int] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 targets_cache_dir: str | None = None) -> CGLEvaluation:
  """CGL (and contrastive entropy) of `model` with `params` on `queries`; see the module docstring.
  `targets_cache_dir`: see `pair_identifiers`."""
  t0 = time.perf_counter()
  seqs = build_sequences(collection, scheme, vocabulary, queries, target_seed=target_seed,
                         num_negatives=num_negatives, negatives_seed=negatives_seed,
                         negatives_path=negatives_path, input_length=input_length, target_length=target_length,
                         query_prefix=query_prefix, min_grade=min_grade,
                         allow_fewer_negatives=allow_fewer_negatives, targets_cache_dir=targets_cache_dir)
  build_s = time.perf_counter() - t0
  scorer = scoring.PairScorer(model, params, mesh=mesh, batch_size=batch_size, inputs_per_batch=inputs_per_batch,
                              share_inputs=share_inputs, length_buckets=length_buckets)
  scored = scorer.score(seqs.inputs, seqs.targets, input_index=seqs.row_query, progress=progress)
  result = reduce_scores(seqs, scored.nll, scored.num_tokens, averaging)
  stats = dict(scored.stats, build_seconds=build_s,
               sequences_per_second=seqs.num_sequences / max(scored.stats.get("seconds", 0.0), 1e-9))
  return CGLEvaluation(result, seqs.query_ids, seqs.negatives, dict(seqs.skipped), stats, seqs.num_sequences)


def evaluation_json(ev: CGLEvaluation, *, bootstrap_resamples: int = 1000, bootstrap_seed: int = 0,
                    extra: dict[str, Any] | None = None) -> dict:
  """The `genret cgl` output: mean CGL / CE with bootstrap CIs over queries, and per-query values."""
  return {**(extra or {}), "summary": ev.result.summary(bootstrap_resamples, bootstrap_seed),
          "negatives": {"seed": ev.negatives.seed, "num_negatives": ev.negatives.num_negatives,
                        "fingerprint": ev.negatives.fingerprint()},
          "skipped": ev.skipped, "num_sequences": ev.num_sequences, "scoring": ev.scoring_stats,
          "per_query": ev.result.per_query(list(ev.query_ids))}
