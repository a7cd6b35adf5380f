"""Host-side suffix array over a tokenised corpus: the n-gram index behind the substring constraint and
the retrieval stage's occurrence lookups (numpy; built with pydivsufsort).

Layout: the text is every document's tokens followed by one separator token, in document order
(`doc_starts[i]` is where document i begins; `doc_starts[-1] == num_tokens`). Documents must not contain
the separator, so no n-gram that avoids the separator can span two documents. Tokens are stored as
uint16 when every id (separator included) is below 65,536, else int32; the suffix array is int32 up to
2^31 - 1 tokens and int64 beyond (a host index only: on device such a corpus goes in shards,
`ShardedSubstringConstraint`, docs/decoding.md). Memory is 6 bytes per token with uint16 tokens (8 with
int32 tokens, 10 with an int64 suffix array), plus 8 bytes per document.

Semantics match the reference FM-index (SLGR_BEHAVIOUR.md §1.1) read forward: `range(ngram)` is the
half-open row interval of suffixes that start with `ngram`, and `count(ngram) = hi - lo` is the number of
occurrences (not documents). Unlike the reference, an n-gram that does not occur returns an empty range
(lo == hi) whose position is where it would sort, never a row that locates to an arbitrary document.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np

from genret_jax.errors import InputError

FORMAT_VERSION = 1
# One int32 suffix array addresses at most this many positions; a larger corpus gets an int64 array.
MAX_INT32_TOKENS = 2**31 - 1
_FILES = ("tokens.npy", "sa.npy", "doc_starts.npy", "meta.json")


def _token_dtype(max_id: int) -> np.dtype:
  return np.dtype(np.uint16) if max_id < 2**16 else np.dtype(np.int32)


class SuffixArrayIndex:
  """Suffix array over documents separated by `sep_id` (see the module docstring)."""

  def __init__(self, tokens: np.ndarray, sa: np.ndarray, doc_starts: np.ndarray, sep_id: int,
               build_seconds: float | None = None):
    self.tokens = tokens
    self.sa = sa
    self.doc_starts = doc_starts
    self.sep_id = int(sep_id)
    self.build_seconds = build_seconds

  # --- construction -------------------------------------------------------------------------------

  @classmethod
  def build(cls, docs: Sequence[np.ndarray], sep_id: int) -> "SuffixArrayIndex":
    """Builds the index. Raises InputError naming the document that contains `sep_id` or a bad id."""
    import pydivsufsort  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    doc_starts = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths + 1, out=doc_starts[1:])
    total = int(doc_starts[-1])
    max_id = int(sep_id)
    for i, d in enumerate(docs):
      d = np.asarray(d)
      if d.size:
        if d.min() < 0:
          raise InputError(f"document {i} has a negative token id {int(d.min())}", key="suffix_array")
        max_id = max(max_id, int(d.max()))
    dtype = _token_dtype(max_id)
    tokens = np.full(total, sep_id, dtype=dtype)
    for i, d in enumerate(docs):
      d = np.asarray(d)
      if d.size and np.any(d == sep_id):
        raise InputError(f"document {i} contains the separator id {sep_id}; pick a separator that "
                         "never occurs in documents", key="suffix_array.sep_id")
      tokens[doc_starts[i]:doc_starts[i] + len(d)] = d
    if total:
      wide = total >= MAX_INT32_TOKENS
      sa = np.asarray(pydivsufsort.divsufsort(tokens, force64=wide), dtype=np.int64 if wide else np.int32)
    else:
      sa = np.zeros(0, np.int32)
    return cls(tokens, sa, doc_starts, sep_id, build_seconds=time.perf_counter() - start)

  @classmethod
  def build_shards(cls, docs: Sequence[np.ndarray], sep_id: int, num_shards: int) -> list["SuffixArrayIndex"]:
    """One index per contiguous run of documents, `num_shards` runs of about equal token counts (a
    document is never split, so no n-gram is lost); shard k holds documents [first_doc[k], first_doc[k+1]).
    For corpora past one shard's 2^31 - 1 tokens or one device's memory (docs/decoding.md)."""
    if num_shards < 1:
      raise InputError(f"num_shards must be >= 1, got {num_shards}", key="index_shards")
    if num_shards > max(len(docs), 1):
      raise InputError(f"{num_shards} shards for {len(docs)} documents: a shard needs at least one document",
                       key="index_shards")
    bounds = shard_bounds([len(d) + 1 for d in docs], num_shards)
    return [cls.build(docs[bounds[k]:bounds[k + 1]], sep_id) for k in range(num_shards)]

  def split(self, num_shards: int) -> list["SuffixArrayIndex"]:
    """This index's documents as `num_shards` shard indexes (`build_shards`)."""
    return self.build_shards([self.doc_tokens(d) for d in range(self.num_docs)], self.sep_id, num_shards)

  # --- persistence --------------------------------------------------------------------------------

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "tokens.npy"), self.tokens)
    np.save(os.path.join(directory, "sa.npy"), self.sa)
    np.save(os.path.join(directory, "doc_starts.npy"), self.doc_starts)
    meta = {"kind": "suffix_array", "format_version": FORMAT_VERSION, "sep_id": self.sep_id,
            "num_docs": self.num_docs, "num_tokens": self.num_tokens,
            "token_dtype": str(self.tokens.dtype), "nbytes": self.nbytes,
            "bytes_per_token": self.bytes_per_token, "build_seconds": self.build_seconds}
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)

  @classmethod
  def load(cls, directory: str, mmap: bool = True) -> "SuffixArrayIndex":
    """Loads a saved index; with `mmap` the arrays are memory-mapped (nothing read until used)."""
    for name in _FILES:
      if not os.path.exists(os.path.join(directory, name)):
        raise InputError(f"not a suffix-array index directory (missing {name})", path=directory)
    with open(os.path.join(directory, "meta.json")) as f:
      meta = json.load(f)
    if meta.get("kind") != "suffix_array" or meta.get("format_version") != FORMAT_VERSION:
      raise InputError(f"unsupported index kind/version {meta.get('kind')}/{meta.get('format_version')}",
                       path=os.path.join(directory, "meta.json"))
    mode = "r" if mmap else None
    load = lambda n: np.load(os.path.join(directory, n), mmap_mode=mode)
    return cls(load("tokens.npy"), load("sa.npy"), np.asarray(load("doc_starts.npy")),
               meta["sep_id"], meta.get("build_seconds"))

  # --- sizes --------------------------------------------------------------------------------------

  @property
  def num_tokens(self) -> int:
    """Indexed text length: document tokens plus one separator per document."""
    return int(self.tokens.shape[0])

  @property
  def num_docs(self) -> int:
    return int(self.doc_starts.shape[0] - 1)

  @property
  def nbytes(self) -> int:
    return int(self.tokens.nbytes + self.sa.nbytes + self.doc_starts.nbytes)

  @property
  def bytes_per_token(self) -> float:
    return self.nbytes / max(self.num_tokens, 1)

  # --- queries ------------------------------------------------------------------------------------

  def _lower_bound(self, lo: int, hi: int, depth: int, token: int) -> int:
    tokens, sa = self.tokens, self.sa
    while lo < hi:
      mid = (lo + hi) // 2
      if int(tokens[int(sa[mid]) + depth]) < token:
        lo = mid + 1
      else:
        hi = mid
    return lo

  def narrow(self, lo: int, hi: int, depth: int, token: int) -> tuple[int, int]:
    """The interval of `prefix + [token]` given the interval [lo, hi) of a prefix of length `depth`."""
    token = int(token)
    if token == self.sep_id or token < 0 or lo >= hi:
      return lo, lo
    # Every suffix in a depth-d interval has d non-separator tokens, and the text ends with a separator,
    # so sa[i] + depth is always inside the text.
    new_lo = self._lower_bound(lo, hi, depth, token)
    new_hi = self._lower_bound(new_lo, hi, depth, token + 1)
    return new_lo, new_hi

  def range(self, ngram: Sequence[int]) -> tuple[int, int]:
    """Half-open suffix-array rows of the suffixes starting with `ngram` (empty ngram: all rows)."""
    lo, hi = 0, self.num_tokens
    for depth, tok in enumerate(ngram):
      lo, hi = self.narrow(lo, hi, depth, int(tok))
      if lo >= hi:
        return lo, lo
    return lo, hi

  def count(self, ngram: Sequence[int]) -> int:
    """Number of occurrences of `ngram` inside documents (the reference's `get_count`)."""
    if len(ngram) == 0:
      return 0
    lo, hi = self.range(ngram)
    return hi - lo

  def occurrences(self, ngram: Sequence[int], limit: int | None = None) -> np.ndarray:
    """Text positions of (at most `limit`) occurrences, in suffix-array order (int64)."""
    if len(ngram) == 0:
      return np.zeros(0, np.int64)
    lo, hi = self.range(ngram)
    if limit is not None:
      hi = min(hi, lo + int(limit))
    return np.asarray(self.sa[lo:hi], dtype=np.int64)

  def doc_of(self, positions: np.ndarray) -> np.ndarray:
    """Document index of each text position."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.searchsorted(self.doc_starts, positions, side="right") - 1

  def doc_tokens(self, doc_idx: int) -> np.ndarray:
    """The tokens of one document (without its separator)."""
    if not 0 <= doc_idx < self.num_docs:
      raise IndexError(f"document index {doc_idx} out of range [0, {self.num_docs})")
    return np.asarray(self.tokens[self.doc_starts[doc_idx]:self.doc_starts[doc_idx + 1] - 1])


def shard_bounds(doc_lengths: Sequence[int], num_shards: int) -> list[int]:
  """First document of each of `num_shards` contiguous runs (plus the end), cut where the running token
  count passes k / num_shards of the total; every run keeps at least one document when there are enough."""
  n = len(doc_lengths)
  ends = np.cumsum(np.asarray(doc_lengths, np.int64))
  total = int(ends[-1]) if n else 0
  cuts = [0]
  for k in range(1, num_shards):
    cut = int(np.searchsorted(ends, total * k / num_shards, side="left")) + 1
    cuts.append(min(max(cut, cuts[-1] + 1), n - (num_shards - k)))
  return cuts + [n]
