"""Prefix-trie constraint for docid-like identifiers (naive, semantic, codebook, title, atomic), laid out
for accelerators in the STATIC way (ANCHORS.md §4.7): the trie is flattened on the host into CSR
transitions (`indptr`, sorted `edge_tokens`, `edge_child`), and the first level(s) also get a dense
`[nodes, vocab]` child table so the widest nodes (the root, and for small vocabularies the second level)
are one row gather. The per-hypothesis state is the trie node id (-1 = dead).

Identifiers are token-id sequences ending in EOS (EOS is appended when missing; an EOS before the end is
an error). A hypothesis is a valid result only once it has emitted EOS, so identifiers longer than the
search's `max_decode_len` (EOS included) are never returned.

Node numbering is breadth-first and, within a level, by (parent, token); so the edges sorted by child id
are already grouped by parent with sorted tokens, which is the CSR order.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax.decoding.constraints import NEG_INF, lower_bound, next_pow2, pad_to, search_iters
from genret_jax.errors import InputError

DEFAULT_DENSE_BUDGET_BYTES = 64 << 20
# Sparse steps (`sparse_allowed`) only when the CSR width is at most V / this: reading S log-probs per row
# then costs well under the [N, V] mask and scan it replaces.
SPARSE_WIDTH_RATIO = 8


def _padded_matrix(sequences: Sequence[Sequence[int]], vocab_size: int, eos_id: int) -> np.ndarray:
  seqs = []
  for i, s in enumerate(sequences):
    s = [int(t) for t in s]
    if not s or s[-1] != eos_id:
      s.append(eos_id)
    for t in s[:-1]:
      if t == eos_id:
        raise InputError(f"identifier {i} has EOS ({eos_id}) before its end: {s}", key="trie")
    if min(s) < 0 or max(s) >= vocab_size:
      raise InputError(f"identifier {i} has a token id outside [0, {vocab_size}): {s}", key="trie")
    seqs.append(s)
  max_len = max((len(s) for s in seqs), default=0)
  mat = np.full((len(seqs), max_len), -1, np.int64)
  for i, s in enumerate(seqs):
    mat[i, :len(s)] = s
  return mat


@flax.struct.dataclass
class TrieConstraint:
  """Device-side trie (see the module docstring). Build with `TrieConstraint.build`."""

  dense: jax.Array            # [Dp, V] int32 child node or -1, rows = node ids < num_dense
  indptr: jax.Array           # [Np + 1] int32 CSR row pointers
  edge_tokens: jax.Array      # [Ep] int32, sorted within each node; padding = vocab_size
  edge_child: jax.Array       # [Ep] int32
  num_dense: jax.Array        # scalar int32: nodes with a dense row
  # Sizes, for reporting. Leaves rather than static fields, so tries of one padded shape share a
  # compiled search.
  num_nodes: jax.Array
  num_identifiers: jax.Array
  max_length: jax.Array       # longest identifier, EOS included
  vocab_size: int = flax.struct.field(pytree_node=False)
  max_branch: int = flax.struct.field(pytree_node=False)   # static width of the CSR gather
  truncated_is_valid: bool = flax.struct.field(pytree_node=False, default=False)
  # Sparse steps (`sparse_allowed`): None = when max_branch * SPARSE_WIDTH_RATIO <= vocab_size.
  sparse_steps: bool | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def build(cls, sequences: Sequence[Sequence[int]], *, vocab_size: int, eos_id: int,
            dense_levels: int | None = None, dense_budget_bytes: int = DEFAULT_DENSE_BUDGET_BYTES,
            max_branch: int | None = None, bucket: bool = True,
            capacity: int = 0) -> "TrieConstraint":
    """Flattens identifiers into device arrays.

    Args:
      sequences: token-id sequences (EOS appended when missing); duplicates collapse.
      vocab_size: model vocabulary size V.
      eos_id: end-of-identifier token.
      dense_levels: trie levels (from the root) that get dense rows; default: as many as fit
        `dense_budget_bytes` (the root always does).
      max_branch: static CSR gather width (>= the largest branching below the dense levels); pass a
        fixed value to share one compiled search between tries.
      bucket: pad array sizes to powers of two (nodes and edges at least `capacity`), so similar tries
        share compiled programs.
    """
    mat = _padded_matrix(sequences, vocab_size, eos_id)
    n, max_len = mat.shape
    if n:
      mat = mat[np.lexsort(mat.T[::-1])]
    parents, tokens = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    level_counts = [1]
    prev_ids = np.zeros(n, np.int64)           # node id of each row's prefix at the current depth
    next_id = 1
    for level in range(max_len):
      has = mat[:, level] >= 0
      diff = np.ones(n, bool)
      if n > 1:
        diff[1:] = np.any(mat[1:, :level + 1] != mat[:-1, :level + 1], axis=1)
      new = has & diff
      ids = np.cumsum(new) - 1 + next_id
      parents.append(prev_ids[new])
      tokens.append(mat[new, level])
      count = int(new.sum())
      level_counts.append(count)
      next_id += count
      prev_ids = np.where(has, ids, -1)
    parent = np.concatenate(parents)
    token = np.concatenate(tokens)
    num_nodes = next_id
    indptr = np.zeros(num_nodes + 1, np.int64)
    np.cumsum(np.bincount(parent, minlength=num_nodes), out=indptr[1:])
    edge_child = np.arange(1, num_nodes, dtype=np.int64)

    level_starts = np.cumsum([0] + level_counts)      # node ids of level l: [starts[l], starts[l+1])
    if dense_levels is None:
      dense_levels = 1
      while (dense_levels < len(level_counts)
             and level_starts[dense_levels + 1] * vocab_size * 4 <= dense_budget_bytes):
        dense_levels += 1
    dense_levels = max(1, min(int(dense_levels), len(level_counts)))
    num_dense = int(level_starts[dense_levels])
    dense = np.full((num_dense, vocab_size), -1, np.int32)
    for node in range(num_dense):
      lo, hi = indptr[node], indptr[node + 1]
      dense[node, token[lo:hi]] = edge_child[lo:hi]
    degrees = np.diff(indptr)
    csr_max = int(degrees[num_dense:].max()) if num_nodes > num_dense else 1
    if max_branch is None:
      max_branch = next_pow2(csr_max) if bucket else max(csr_max, 1)
    elif max_branch < csr_max:
      raise InputError(f"max_branch={max_branch} < largest branching {csr_max} below the dense levels",
                       key="trie.max_branch")
    size = (lambda k: next_pow2(k, capacity)) if bucket else (lambda k: max(k, capacity, 1))
    num_edges = num_nodes - 1
    dense_p = pad_to(dense, next_pow2(num_dense) if bucket else num_dense, -1)
    indptr_p = pad_to(indptr, size(num_nodes) + 1, num_edges)
    tokens_p = pad_to(token, size(num_edges), vocab_size)
    child_p = pad_to(edge_child, size(num_edges), -1)
    return cls(dense=jnp.asarray(dense_p, jnp.int32), indptr=jnp.asarray(indptr_p, jnp.int32),
               edge_tokens=jnp.asarray(tokens_p, jnp.int32), edge_child=jnp.asarray(child_p, jnp.int32),
               num_dense=jnp.asarray(num_dense, jnp.int32), vocab_size=int(vocab_size),
               max_branch=int(max_branch), num_nodes=np.int32(num_nodes), num_identifiers=np.int32(n),
               max_length=np.int32(max_len))

  _ARRAYS = ("dense", "indptr", "edge_tokens", "edge_child", "num_dense", "num_nodes", "num_identifiers",
             "max_length")

  def save(self, directory: str) -> None:
    """Writes the flattened arrays (`<name>.npy`) and `meta.json`."""
    os.makedirs(directory, exist_ok=True)
    for name in self._ARRAYS:
      np.save(os.path.join(directory, f"{name}.npy"), np.asarray(getattr(self, name)))
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump({"kind": "trie", "format_version": 1, "vocab_size": self.vocab_size,
                 "max_branch": self.max_branch, "num_nodes": int(self.num_nodes),
                 "num_identifiers": int(self.num_identifiers), "nbytes": self.nbytes}, f, indent=2)

  @classmethod
  def load(cls, directory: str) -> "TrieConstraint":
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
      raise InputError("not a trie directory (missing meta.json)", path=directory)
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("kind") != "trie":
      raise InputError(f"index kind is {meta.get('kind')!r}, not 'trie'", path=meta_path)
    arrays = {}
    for name in cls._ARRAYS:
      path = os.path.join(directory, f"{name}.npy")
      if not os.path.exists(path):
        raise InputError(f"missing {name}.npy", path=directory)
      x = np.load(path)
      arrays[name] = jnp.asarray(x) if x.ndim else np.int32(x)
    return cls(**arrays, vocab_size=meta["vocab_size"], max_branch=meta["max_branch"])

  @property
  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in (self.dense, self.indptr, self.edge_tokens, self.edge_child)))

  # --- protocol -----------------------------------------------------------------------------------

  def init_state(self, num_rows: int) -> jax.Array:
    return jnp.zeros((num_rows,), jnp.int32)

  def _rows(self, node):
    alive = node >= 0
    safe = jnp.maximum(node, 0)
    in_dense = alive & (safe < self.num_dense)
    start = jnp.take(self.indptr, safe, mode="clip")
    end = jnp.take(self.indptr, safe + 1, mode="clip")
    return alive, safe, in_dense, start, end

  def mask_log_probs(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    del beam_scores, num_beams, num_candidates   # the trie checks every allowed token: always exact
    n, v = log_probs.shape
    alive, safe, in_dense, start, end = self._rows(state)
    dense_row = jnp.take(self.dense, jnp.minimum(safe, self.dense.shape[0] - 1), axis=0, mode="clip")
    masked = jnp.where(in_dense[:, None] & (dense_row >= 0), log_probs, NEG_INF)
    tok = self._csr_tokens(alive & ~in_dense, start, end)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], tok.shape)
    vals = jnp.take_along_axis(log_probs, jnp.minimum(tok, v - 1), axis=1)
    return masked.at[rows, tok].set(vals, mode="drop")

  def _csr_tokens(self, ok_rows, start, end):
    """[N, max_branch] child tokens of the CSR nodes in `ok_rows` (sorted, distinct), vocab_size elsewhere."""
    edge = start[:, None] + jnp.arange(self.max_branch, dtype=jnp.int32)[None, :]
    ok = ok_rows[:, None] & (edge < end[:, None])
    return jnp.where(ok, jnp.take(self.edge_tokens, edge, mode="clip"), self.vocab_size)

  def sparse_allowed(self, state, beam_scores):
    """(tokens [N, max_branch], usable): usable when no live row is at a dense-table node (the levels
    below them are the narrow ones) and sparse steps are on (see `sparse_steps`)."""
    alive, _, in_dense, start, end = self._rows(state)
    live = beam_scores > NEG_INF / 2
    on = (self.max_branch * SPARSE_WIDTH_RATIO <= self.vocab_size if self.sparse_steps is None
          else self.sparse_steps)
    usable = on & ~jnp.any(live & in_dense)
    return self._csr_tokens(alive & ~in_dense, start, end), usable

  def advance(self, state, tokens):
    alive, safe, in_dense, start, end = self._rows(state)
    tokens = tokens.astype(jnp.int32)
    dense_child = self.dense[jnp.minimum(safe, self.dense.shape[0] - 1),
                             jnp.clip(tokens, 0, self.vocab_size - 1)]
    key = lambda i: jnp.take(self.edge_tokens, i, mode="clip")
    pos = lower_bound(key, start, end, tokens, search_iters(self.max_branch))
    found = (pos < end) & (key(pos) == tokens)
    csr_child = jnp.where(found, jnp.take(self.edge_child, pos, mode="clip"), -1)
    child = jnp.where(in_dense, dense_child, csr_child)
    valid_tok = (tokens >= 0) & (tokens < self.vocab_size)
    return jnp.where(alive & valid_tok, child, -1)

  def count(self, state):
    return jnp.full(state.shape, -1, jnp.int32)
