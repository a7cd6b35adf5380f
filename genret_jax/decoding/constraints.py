"""The constraint protocol used by `beam_search`, shared device helpers, and `Unconstrained`.

A constraint is a pytree (a `flax.struct.dataclass`): its device arrays (trie tables, suffix array) are
leaves, so a jitted beam search receives them as arguments rather than baking them into the program as
constants, and they can be placed or sharded like any other input. Its per-hypothesis state is a pytree
whose leaves have the flattened `batch * beam` rows as their leading axis; the beam search gathers it
together with the KV cache. Nothing in the protocol calls back to the host.

Protocol (duck-typed, see `Constraint`):
  init_state(num_rows) -> state
  mask_log_probs(state, log_probs [N, V], beam_scores [N], *, num_beams, num_candidates) -> [N, V]
      log-probs with every token that is not allowed set to NEG_INF. It must be *exact for the search*:
      the top `num_candidates` of (beam_score + masked) over each query's `num_beams` rows must equal
      the top `num_candidates` under the true allowed set. Implementations may leave an allowed token
      masked only when it provably cannot enter that top set.
  sparse_allowed(state, beam_scores [N]) -> (tokens [N, S], usable)     optional. When `usable` (a traced
      bool) is true, row i's allowed set is exactly the distinct ids in tokens[i] (V fills unused slots)
      for every live row (beam_score > NEG_INF / 2); the search then reads log-probs at those S tokens
      instead of masking and scanning [N, V] (`beam_search.sparse_candidate_top_k`). When false,
      `mask_log_probs` is used for that step.
  advance(state, tokens [N]) -> state     the state after appending `tokens` (EOS included).
  count(state) -> int32 [N]               corpus count of the prefix (n-gram mode), -1 when undefined.
  truncated_is_valid: bool                whether a hypothesis cut off at max_decode_len without EOS is a
                                          valid result (true for n-grams and unconstrained decoding,
                                          false for docids, which are only complete after EOS).
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# t5x's NEG_INF: large but finite, so sums of a few of them stay finite in float32.
NEG_INF = -1.0e7

PyTree = Any


class Constraint(Protocol):
  """What `beam_search` needs from a constraint (see the module docstring)."""

  truncated_is_valid: bool

  def init_state(self, num_rows: int) -> PyTree:
    ...

  def mask_log_probs(self, state: PyTree, log_probs: jax.Array, beam_scores: jax.Array, *,
                     num_beams: int, num_candidates: int) -> jax.Array:
    ...

  def advance(self, state: PyTree, tokens: jax.Array) -> PyTree:
    ...

  def count(self, state: PyTree) -> jax.Array:
    ...


@flax.struct.dataclass
class Unconstrained:
  """No constraint: every token is allowed; a hypothesis cut at max length is a valid result."""

  truncated_is_valid: bool = flax.struct.field(pytree_node=False, default=True)

  def init_state(self, num_rows: int) -> jax.Array:
    return jnp.zeros((num_rows,), jnp.int32)

  def mask_log_probs(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    del state, beam_scores, num_beams, num_candidates
    return log_probs

  def advance(self, state, tokens):
    del tokens
    return state

  def count(self, state):
    return jnp.full(state.shape, -1, jnp.int32)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` behind an optimization barrier. XLA:CPU turns top-k into its fast TopK kernel only when the
  sort's results are used through slices starting at 0; a later `values[:, k - 1]` gets folded into the sort
  and leaves a full sort of every row (far slower, e.g. for [64, 8192] and k = 65)."""
  values, indices = jax.lax.top_k(x, k)
  # One barrier per array: a barrier over both would be folded onto the TopK tuple itself, which XLA:CPU's
  # later passes reject (check failure: a TopK user that is not a get-tuple-element).
  return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(indices)


def batched_take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, W, ...], idx [B, J] -> [B, J, ...].

  mode="clip" here and in `beam_search._gather_beams`: every index is a top-k position, so always in range,
  and jnp.take's default ("fill") wraps each gather in a select over its whole output (the cache included)
  for out-of-range rows that never occur; XLA's gather clamps anyway, so "clip" is the bare gather (the tiny
  beam-20 program's optimized HLO shrank by 16%, identical results; session 11)."""
  return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0, mode="clip"))(x, idx)


# Block width of `block_top_k`'s pre-selection; 0 turns it off (one top-k over each whole row).
TOPK_BLOCK = 128


def block_top_k(x: jax.Array, c: int, segment_offsets: jax.Array | None = None,
                block: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Top `c` of each row of x [R, L], with `segment_offsets` [R, S] (optional) added to every element of
  the row's s-th of S equal segments: (values [R, c], positions [R, c] int32), as `top_k` of the offset
  rows returns them. `block` (default TOPK_BLOCK; 0: off) is the widest pre-selection block.

  A top-k of a long row is dear everywhere: XLA:CPU's TopK spends ~4 ns per element (a [32, 20 x 8,192]
  top-40 took 23 ms, more than the step's output projection) and XLA:GPU sorts every row in full (the
  n-gram top-M check's [640, 8,192] top-65 was a third of the biased search's H200 kernel time; session 13).
  So the candidates are pre-selected by blocks: the maxima of `block`-wide blocks (inside segments), the
  top `c` blocks by maximum, then the top `c` of those blocks' elements. Exact: a block holding one of the
  top `c` values has a maximum at least that value, and fewer than `c` blocks can beat it, so the values
  are those of the full top-k; positions can differ only among exactly tied values."""
  r, length = x.shape
  segments = 1 if segment_offsets is None else segment_offsets.shape[1]
  seg_len = length // segments
  block = TOPK_BLOCK if block is None else block
  # Narrower blocks on short segments (e.g. a 512 vocabulary), so that there are several times more
  # blocks than candidates and the pre-selection still pays.
  while block > 16 and seg_len % block == 0 and segments * (seg_len // block) <= 4 * c:
    block //= 2
  if not block or seg_len % block or segments * (seg_len // block) <= 2 * c:
    if segment_offsets is not None:
      x = (x.reshape(r, segments, seg_len) + segment_offsets[:, :, None]).reshape(r, length)
    return top_k(x, c)
  per_seg = seg_len // block
  blocks = x.reshape(r, segments * per_seg, block)
  block_max = blocks.max(axis=-1)
  if segment_offsets is not None:
    block_max = (block_max.reshape(r, segments, per_seg) + segment_offsets[:, :, None]).reshape(r, -1)
  # Ascending block order keeps top_k's lower-index-first rule among the gathered elements.
  chosen = jnp.sort(top_k(block_max, c)[1], axis=1)                        # [R, c]
  gathered = batched_take(blocks, chosen)                                   # [R, c, block]
  if segment_offsets is not None:
    gathered = gathered + jnp.take_along_axis(segment_offsets, chosen // per_seg, axis=1)[:, :, None]
  values, pos = top_k(gathered.reshape(r, c * block), c)
  flat = jnp.take_along_axis(chosen, pos // block, axis=1) * block + pos % block
  return values, flat.astype(jnp.int32)


def next_pow2(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum); used to bucket array sizes so shapes (and compiled
  programs) are shared between indexes of similar size."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


def pad_to(x: np.ndarray, size: int, value) -> np.ndarray:
  if x.shape[0] > size:
    raise ValueError(f"cannot pad length {x.shape[0]} to {size}")
  out = np.full((size,) + x.shape[1:], value, dtype=x.dtype)
  out[:x.shape[0]] = x
  return out


def lower_bound(key_fn, lo: jax.Array, hi: jax.Array, target: jax.Array, num_iters: int,
                unroll: bool | None = None) -> jax.Array:
  """Vectorised binary search: the first i in [lo, hi) with key_fn(i) >= target (hi if none).

  `key_fn` maps an int32 index array to the (non-decreasing on [lo, hi)) keys; all arguments broadcast.
  `num_iters` must be >= ceil(log2(max interval size + 1)). A Python int gives a fixed number of gathers
  (unrolled when short); a traced int32 (e.g. `bit_length(max(hi - lo))`, see `interval_iters`) runs only
  as many rounds as the widest interval of this call needs. `unroll` (default: a Python int <= 8) unrolls a
  static round count into straight-line gathers that an accelerator compiles into one kernel.
  """
  lo = jnp.asarray(lo, jnp.int32)
  hi = jnp.asarray(hi, jnp.int32)
  lo, hi, target = jnp.broadcast_arrays(lo, hi, target)

  def body(_, carry):
    lo, hi = carry
    active = lo < hi
    mid = lo + (hi - lo) // 2
    go_right = key_fn(jnp.where(active, mid, 0)) < target
    return (jnp.where(active & go_right, mid + 1, lo), jnp.where(active & ~go_right, mid, hi))

  if isinstance(num_iters, int):
    # Unrolling short searches helps accelerators; long ones are kept rolled unless asked, so CPU
    # compiles stay fast.
    unroll = num_iters <= 8 if unroll is None else unroll
    lo, _ = jax.lax.fori_loop(0, num_iters, body, (lo, hi), unroll=bool(unroll) and num_iters > 0)
  else:
    lo, _ = jax.lax.fori_loop(0, num_iters, body, (lo, hi))
  return lo


def search_iters(size: int) -> int:
  return max(1, int(size).bit_length() + 1)


def interval_iters(sizes: jax.Array) -> jax.Array:
  """Traced binary-search rounds enough for every interval in `sizes` (0 when all are empty):
  bit_length(max size), as `lower_bound` halves [lo, hi) until it is empty."""
  m = jnp.maximum(jnp.max(sizes.astype(jnp.int32), initial=0), 0)
  return (32 - jax.lax.clz(m)).astype(jnp.int32)
