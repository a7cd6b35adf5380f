"""End-to-end retrieval for one model: queries -> jitted constrained beam search -> documents.

Takes the scheme's constraint (`scheme_index.build_scheme_index`: a trie over the tokenised docids, or a suffix
array over the tokenised document views for n-grams), runs `decoding.beam_search` jitted over fixed-shape query
batches (the last batch padded and masked), and turns each batch into ranked documents with `run.retrieve_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax import multihost
from genret_jax.corpora.types import Collection, Query
from genret_jax.decoding.beam_search import beam_search
from genret_jax.decoding.sharded_substring import ShardedSubstringConstraint
from genret_jax.errors import InputError, check_int
from genret_jax.identifiers.vocab import encode_batch
from genret_jax.models import partitioning
from genret_jax.retrieval import run as run_lib
from genret_jax.retrieval.ngram_scoring import NgramScoringConfig
from genret_jax.retrieval.ranking_pool import RankingPool
from genret_jax.retrieval.run_files import QueryResult
from genret_jax.retrieval.scheme_index import EOS_ID, SchemeIndex, build_scheme_index

PAD_ID = 0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  beam_size: int = 20
  # n-gram identifiers: tokens generated per query (the reference's T5 runs generate 9); docid schemes
  # decode up to the longest identifier + EOS when this is 0.
  max_decode_len: int = 0
  ngram_max_decode_len: int = 10
  alpha: float = 0.0
  batch_size: int = 32
  inputs_length: int = 64
  hits: int = 100
  query_prefix: str = ""
  # n-gram identifiers: suffix-array shards on device (documents split into this many runs); with a mesh the
  # shards are placed over its `model` axis when its size divides them (docs/decoding.md, "Sharding").
  index_shards: int = 1
  # n-gram identifiers: processes that score documents (`ranking_pool`); the host scoring, not the decoding,
  # bounds a job on an accelerator. 1: in this process. Does not change the results.
  ranking_workers: int = 1

  def __post_init__(self):
    for name, low in (("beam_size", 1), ("batch_size", 1), ("inputs_length", 1), ("hits", 1),
                      ("max_decode_len", 0), ("ngram_max_decode_len", 1), ("index_shards", 1),
                      ("ranking_workers", 1)):
      check_int(getattr(self, name), f"RetrievalConfig.{name}", low)


def encode_inputs(vocab, texts: Sequence[str], length: int, prefix: str = "") -> np.ndarray:
  """Like the seqio tasks: tokenise, trim, append EOS, right-pad with 0."""
  out = np.zeros((len(texts), length), np.int32)
  for i, encoded in enumerate(encode_batch(vocab, [prefix + t for t in texts])):
    ids = encoded[:length - 1] + [EOS_ID]
    out[i, :len(ids)] = ids
  return out


class Retriever:
  """Retrieval with one model (params fixed) and one identifier scheme; `search` is jitted once per shape."""

  def __init__(self, model, params, scheme, vocab, collection: Collection, cfg: RetrievalConfig | None = None,
               scoring: NgramScoringConfig | None = None, mesh=None, scheme_index: SchemeIndex | None = None):
    self.model, self.params, self.scheme, self.vocab, self.collection = model, params, scheme, vocab, collection
    self.cfg = cfg or RetrievalConfig()
    self.scoring = scoring or NgramScoringConfig(hits=self.cfg.hits)
    self.index = scheme_index or build_scheme_index(scheme, vocab, model.config.vocab_size, self.cfg.index_shards)
    shards = self.index.constraint.num_shards if isinstance(self.index.constraint, ShardedSubstringConstraint) else 1
    if scheme_index is not None and self.index.ngram_index is not None and shards != self.cfg.index_shards:
      raise InputError(f"the scheme index given has {shards} suffix-array shard(s), the config asks for "
                       f"{self.cfg.index_shards}; build it with index_shards={self.cfg.index_shards}",
                       key="index_shards")
    if mesh is not None:
      shape = dict(zip(mesh.axis_names, mesh.devices.shape))
      rows = shape.get("data", 1) * shape.get("fsdp", 1)
      if self.cfg.batch_size % rows:
        raise InputError(f"batch size {self.cfg.batch_size} does not split over the mesh's {rows} data x fsdp "
                         "devices; use a multiple", key="INFER_BATCH_SIZE")
    if mesh is not None and isinstance(self.index.constraint, ShardedSubstringConstraint):
      self.index = dataclasses.replace(self.index, constraint=self.index.constraint.place(mesh))
    self.is_ngram = self.index.ngram_index is not None
    if self.cfg.max_decode_len:
      self.max_decode_len = self.cfg.max_decode_len
    elif self.is_ngram:
      self.max_decode_len = self.cfg.ngram_max_decode_len
    else:
      self.max_decode_len = self.index.max_identifier_len
    self.mesh = mesh
    self.doc_ids = [d.doc_id for d in collection.documents]
    self._search = {}
    self._pool = None

  def _compiled(self, beam: int):
    if beam not in self._search:
      model, L, cfg = self.model, self.max_decode_len, self.cfg
      keep = self.is_ngram

      def search(params, constraint, inputs, query_mask):
        cache, first = model.decode_init(params, inputs, L)
        return beam_search(functools.partial(model.tokens_to_logits, params), cache, first, num_beams=beam,
                           max_decode_len=L, eos_id=EOS_ID, pad_id=PAD_ID, alpha=cfg.alpha,
                           constraint=constraint, keep_history=keep, query_mask=query_mask)

      self._search[beam] = jax.jit(search)
    return self._search[beam]

  def decode(self, inputs: np.ndarray, query_mask: np.ndarray, beam: int):
    fn = self._compiled(beam)
    if self.mesh is not None:
      with jax.set_mesh(self.mesh):
        # Every process holds the whole batch (the job's queries were compared across processes).
        inputs = multihost.place_global(inputs, partitioning.batch_sharding(self.mesh, 2))
        query_mask = multihost.place_global(query_mask, partitioning.batch_sharding(self.mesh, 1))
        out = fn(self.params, self.index.constraint, inputs, query_mask)
      # Every process gets every row (one small all-gather on several hosts; the search itself stays sharded).
      return multihost.host_array(out)
    return jax.device_get(fn(self.params, self.index.constraint, jnp.asarray(inputs), jnp.asarray(query_mask)))

  def close(self) -> None:
    """Stops the ranking workers, if any."""
    if self._pool is not None:
      self._pool.close()
      self._pool = None

  def too_long(self, queries: Sequence[Query]) -> list[str]:
    """Ids of the queries whose tokens (prefix included) do not fit `inputs_length` with their EOS: `batches`
    trims them as the seqio task trimmed the training inputs."""
    room = self.cfg.inputs_length - 1
    texts = [self.cfg.query_prefix + q.text for q in queries]
    return [q.query_id for q, ids in zip(queries, encode_batch(self.vocab, texts)) if len(ids) > room]

  def batches(self, queries: Sequence[Query]) -> Iterator[tuple[int, list[Query], np.ndarray, np.ndarray]]:
    bs = self.cfg.batch_size
    for b, start in enumerate(range(0, len(queries), bs)):
      chunk = list(queries[start:start + bs])
      inputs = encode_inputs(self.vocab, [q.text for q in chunk], self.cfg.inputs_length, self.cfg.query_prefix)
      mask = np.zeros((bs,), bool)
      mask[:len(chunk)] = True
      padded = np.zeros((bs, inputs.shape[1]), np.int32)
      padded[:len(chunk)] = inputs
      padded[len(chunk):, 0] = EOS_ID   # padding rows hold a valid (empty) query; they are masked anyway
      yield b, chunk, padded, mask

  def retrieve_batch(self, chunk: Sequence[Query], inputs: np.ndarray, mask: np.ndarray,
                     beam: int) -> list[QueryResult]:
    out = self.decode(inputs, mask, beam)
    # With a mesh over several processes every process decodes every batch (a collective), so all are here.
    return self.rank_shared(out, chunk) if self.mesh is not None else self.rank(out, chunk)

  def rank_shared(self, out, chunk: Sequence[Query]) -> list[QueryResult]:
    """`rank(out, chunk)` on every process of a multi-host job, which must all call it with the same decoded batch:
    each ranks every P-th query (the n-gram scoring is host time, ~0.1-0.3 s a query, which one process alone
    would spend for the whole pod) and every process gets every result, in order. An error on one process is
    raised on all of them."""
    nproc = jax.process_count()
    if nproc == 1:
      return self.rank(out, chunk)
    rows = range(jax.process_index(), len(chunk), nproc)
    mine = multihost.on_every_process(lambda: self.rank(out, chunk, rows), what="ranking its share of the batch")
    return [mine[r % nproc][r // nproc] for r in range(len(chunk))]

  def rank(self, out, chunk: Sequence[Query], rows: Sequence[int] | None = None) -> list[QueryResult]:
    """Documents for the queries of `chunk` at `rows` (default: all) of one decoded batch."""
    rows = range(len(chunk)) if rows is None else rows
    ids = [chunk[r].query_id for r in rows]
    if self.is_ngram:
      if self._pool is None and self.cfg.ranking_workers > 1:
        self._pool = RankingPool(self.index.ngram_index, self.scoring, self.cfg.ranking_workers)
      return run_lib.retrieve_batch(out, ids, self.doc_ids, index=self.index.ngram_index, cfg=self.scoring,
                                    k=self.cfg.hits, rows=rows, pool=self._pool)
    return run_lib.retrieve_batch(out, ids, self.doc_ids, lookup=self.index.lookup, k=self.cfg.hits, rows=rows)

  def retrieve(self, queries: Sequence[Query], beam: int | None = None, progress: bool = False) -> list[QueryResult]:
    # Explicitly None: a beam of 0 fell back to the configured beam while a sweep recorded it as 0.
    beam = self.cfg.beam_size if beam is None else check_int(beam, "beam")
    results: list[QueryResult] = []
    it = self.batches(queries)
    if progress:
      from tqdm.auto import tqdm
      it = tqdm(it, total=-(-len(queries) // self.cfg.batch_size), desc=f"retrieve beam={beam}", unit="batch")
    for _, chunk, inputs, mask in it:
      results.extend(self.retrieve_batch(chunk, inputs, mask, beam))
    return results
