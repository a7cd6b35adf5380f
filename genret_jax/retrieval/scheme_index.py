"""The constraint a retrieval job decodes with and the host structures that map identifiers back to documents
(`SchemeIndex`), built from an identifier scheme and cached on disk.

* n-gram schemes: one host `SuffixArrayIndex` over every document's views (retrieval scoring reads occurrences
  from it) and, with `index_shards` > 1, one index per run of documents for the device shards;
* docid schemes: a trie over the tokenised identifiers and the identifier -> documents table.

With `cache_dir`, `build_scheme_index` loads what an earlier job (or `genret build-index --task`) saved there and
builds and saves only what is missing, so a job over a 2-3B-token corpus does not re-tokenise it and re-sort its
suffix arrays at every start; suffix arrays load memory-mapped. A cache directory belongs to one (collection,
scheme, vocabulary) — the task artefacts' directory, which is keyed by all three — and one model vocabulary
size; its `meta.json` says what it was built for, and a mismatch rebuilds it (with a warning). Writes go to a
temporary directory renamed into place, so jobs on several hosts sharing the cache never read a partial one.

Layout: `meta.json`; n-gram: `suffix_array/` and `shards_<S>/shard_<k>/` (`SuffixArrayIndex.save`); docid:
`trie/` (`TrieConstraint.save`) and `lookup.npz`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any

import numpy as np

from genret_jax.decoding.sharded_substring import ShardedSubstringConstraint
from genret_jax.decoding.substring import SubstringConstraint
from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.decoding.trie import TrieConstraint
from genret_jax.errors import InputError
from genret_jax.identifiers.vocab import encode_batch
from genret_jax.retrieval.docids import DocidLookup

EOS_ID = 1
# Bump when what is built from a scheme changes (document strings, separator, identifier encoding): older
# caches are then rebuilt instead of read.
FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@dataclasses.dataclass
class SchemeIndex:
  """The constraint and the host structures that map identifiers back to documents."""
  constraint: Any
  lookup: DocidLookup | None
  ngram_index: SuffixArrayIndex | None
  max_identifier_len: int
  num_tokens: int
  nbytes: int
  # How the host structures were obtained: "built" (seconds: build time) or "loaded" from a cache directory
  # (seconds: load time).
  source: str = "built"
  seconds: float = 0.0


def build_scheme_index(scheme, vocab, vocab_size: int, index_shards: int = 1,
                       cache_dir: str | None = None) -> SchemeIndex:
  """The scheme's `SchemeIndex` for a model vocabulary of `vocab_size`; see the module docstring."""
  if index_shards < 1:
    raise InputError(f"index_shards must be >= 1, got {index_shards}", key="index_shards")
  if vocab.vocab_size > vocab_size:
    raise InputError(f"the model's vocabulary ({vocab_size}) is smaller than the task's ({vocab.vocab_size}): "
                     "identifier tokens past it cannot be generated; raise the model's vocab_size", key="vocab_size")
  is_ngram = bool(getattr(scheme, "is_ngram", False))
  if not is_ngram and index_shards != 1:
    raise InputError(f"index_shards={index_shards}: suffix-array shards are for n-gram identifiers; this scheme "
                     "decodes with a trie", key="index_shards")
  meta = {"format_version": FORMAT_VERSION, "kind": "ngram" if is_ngram else "docid",
          "vocab_size": int(vocab_size), "num_docs": int(scheme.num_docs)}
  start = time.perf_counter()
  cached = _read_cache(cache_dir, meta) if cache_dir else None
  if is_ngram:
    si = _ngram_scheme_index(scheme, vocab, vocab_size, index_shards, cache_dir, meta, cached)
  else:
    si = _docid_scheme_index(scheme, vocab, vocab_size, cache_dir, meta, cached)
  si.seconds = time.perf_counter() - start
  return si


def cached_scheme_index(artefacts, vocab, vocab_size: int, index_shards: int = 1) -> SchemeIndex:
  """`build_scheme_index` for a task's artefacts (`tasks.CollectionArtefacts`): its identifier scheme, cached in
  its `retrieval_index_dir(vocab_size)`; what `genret retrieve`, `genret build-index --task` and sweeps use."""
  artefacts.vocab_file()   # built on first use: before the index, so the index's reported time is its own
  return build_scheme_index(artefacts.identifier_scheme(), vocab, vocab_size, index_shards,
                            cache_dir=artefacts.retrieval_index_dir(vocab_size))


def _ngram_scheme_index(scheme, vocab, vocab_size, index_shards, cache_dir, meta, cached) -> SchemeIndex:
  if cached is not None:
    index, source = SuffixArrayIndex.load(os.path.join(cache_dir, "suffix_array")), "loaded"
  else:
    index, source = _ngram_host_index(scheme, vocab, vocab_size), "built"
    if cache_dir:
      _save(cache_dir, {**meta, "num_tokens": index.num_tokens},
            lambda d: index.save(os.path.join(d, "suffix_array")))
  if index_shards > 1:
    shards = _shard_indexes(index, index_shards, cache_dir)
    constraint = ShardedSubstringConstraint.from_shards(shards, vocab_size=vocab_size, eos_id=EOS_ID)
  else:
    constraint = SubstringConstraint.from_index(index, vocab_size=vocab_size, eos_id=EOS_ID)
  return SchemeIndex(constraint, None, index, 0, int(index.num_tokens), int(index.nbytes), source)


def _docid_scheme_index(scheme, vocab, vocab_size, cache_dir, meta, cached) -> SchemeIndex:
  if cached is not None:
    trie = TrieConstraint.load(os.path.join(cache_dir, "trie"))
    with np.load(os.path.join(cache_dir, "lookup.npz")) as z:
      offsets, tokens = z["offsets"], z["tokens"]
      pairs = [(int(d), tokens[offsets[i]:offsets[i + 1]].tolist()) for i, d in enumerate(z["docs"])]
    return SchemeIndex(trie, DocidLookup(pairs), None, cached["max_identifier_len"], cached["num_tokens"],
                       int(trie.nbytes), "loaded")
  listed = [(d, ident) for d in range(scheme.num_docs) for ident in scheme.doc_identifiers(d)]
  if not listed:
    raise InputError(f"the identifier scheme lists no identifiers for its {scheme.num_docs} documents",
                     key="identifiers")
  owners, identifiers = zip(*listed)
  pairs = [(d, tuple(ids)) for d, ids in zip(owners, encode_batch(vocab, identifiers))]
  seqs = [list(toks) + [EOS_ID] for _, toks in pairs]
  trie = TrieConstraint.build(seqs, vocab_size=vocab_size, eos_id=EOS_ID)
  max_len, num_tokens = max(len(s) for s in seqs), sum(len(s) for s in seqs)
  if cache_dir:
    def write(d):
      trie.save(os.path.join(d, "trie"))
      lengths = np.array([len(t) for _, t in pairs], np.int64)
      np.savez(os.path.join(d, "lookup.npz"), docs=np.array(owners, np.int64),
               offsets=np.concatenate([[0], np.cumsum(lengths)]),
               tokens=np.array([t for _, toks in pairs for t in toks], np.int64))
    _save(cache_dir, {**meta, "max_identifier_len": max_len, "num_tokens": num_tokens}, write)
  return SchemeIndex(trie, DocidLookup(pairs), None, max_len, num_tokens, int(trie.nbytes), "built")


def _ngram_host_index(scheme, vocab, vocab_size: int) -> SuffixArrayIndex:
  # As the reference's FM-index: one entry per document (its views joined), separated so that no n-gram spans
  # two documents; positions map straight back to document indices.
  texts = [scheme.document_string(d) for d in range(scheme.num_docs)]
  docs = [np.asarray(ids, np.int32) for ids in encode_batch(vocab, texts)]
  return SuffixArrayIndex.build(docs, sep_id=vocab_size)   # one id past the vocabulary: never generated


def _shard_indexes(index: SuffixArrayIndex, num_shards: int, cache_dir: str | None) -> list[SuffixArrayIndex]:
  """The device shards' host indexes: loaded from `shards_<S>/` when saved, else split from `index` (and saved)."""
  shard_dir = os.path.join(cache_dir, f"shards_{num_shards}") if cache_dir else None
  if shard_dir and os.path.isdir(shard_dir):
    return [SuffixArrayIndex.load(os.path.join(shard_dir, f"shard_{k:05d}")) for k in range(num_shards)]
  shards = index.split(num_shards)
  if shard_dir:
    _atomic_dir(shard_dir, lambda d: [s.save(os.path.join(d, f"shard_{k:05d}")) for k, s in enumerate(shards)])
  return shards


def _read_cache(cache_dir: str, expected: dict) -> dict | None:
  """The cache's meta when it was built for `expected`; None when absent; a stale cache is moved aside."""
  path = os.path.join(cache_dir, "meta.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    meta = {"unreadable": str(e)}
  differs = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
  if not differs:
    return meta
  log.warning("retrieval index cache %s was built for %s, not %s: rebuilding it", cache_dir,
              {k: a for k, (a, _) in differs.items()}, {k: b for k, (_, b) in differs.items()})
  stale = f"{cache_dir}.stale{uuid.uuid4().hex}"   # unique across hosts sharing the filesystem
  try:
    os.rename(cache_dir, stale)
  except OSError:   # another job moved it first
    return None
  shutil.rmtree(stale, ignore_errors=True)
  return None


def _save(cache_dir: str, meta: dict, write) -> None:
  def write_all(d):
    write(d)
    with open(os.path.join(d, "meta.json"), "w") as f:   # last: a directory with meta.json is complete
      json.dump(meta, f, indent=2)
  _atomic_dir(cache_dir, write_all)


def _atomic_dir(path: str, write) -> None:
  """Writes a directory through a temporary one renamed into place; another job's finished copy wins."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{uuid.uuid4().hex}"   # unique across hosts sharing the filesystem (pids are not)
  os.makedirs(tmp)
  write(tmp)
  try:
    os.rename(tmp, path)
  except OSError:   # written meanwhile by another job: keep theirs
    shutil.rmtree(tmp, ignore_errors=True)
