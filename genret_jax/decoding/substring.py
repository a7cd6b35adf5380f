"""Substring constraint for n-gram identifiers: every generated n-gram is a contiguous token sequence
inside one corpus document. Device arrays: the suffix array's text and rows (`SuffixArrayIndex`); the
per-hypothesis state is the suffix-array interval [lo, hi) of the n-gram so far and its length `depth`.
Extending by token t narrows the interval with two binary searches on `text[sa[i] + depth]` (sorted
inside the interval); t is allowed iff the narrowed interval is non-empty, and `hi - lo` is the
n-gram's corpus count (the reference's `get_count`), so counts cost nothing extra.

What ends an n-gram: EOS is allowed once the n-gram is non-empty (every non-empty state is a corpus
substring) unless `allow_eos=False` (the reference bans EOS and decodes exactly max length); reaching
`max_decode_len` also ends it, as a valid result (`truncated_is_valid`). EOS and the separator are never
n-gram content, so no n-gram spans two documents. A hypothesis with no allowed token dies.

Exactness with bounded work. Checking all V tokens of a beam costs V binary searches, so each step
the cheapest exact check that applies is used:
  * depth 0 (empty n-gram): a precomputed [V] mask of the tokens that occur in the corpus; no search;
  * depth 1: a precomputed bigram bit table ([V, V/8] bytes, built when it fits `pair_budget_bytes`,
    e.g. 8 MiB for V = 8,192): the row of the n-gram's token is its exact successor set; no search;
  * an interval with at most `small_interval` suffixes: the next tokens of all its suffixes, read
    directly (sorted, so a change marks a new token): the complete allowed set;
  * otherwise the model's top `top_m` tokens are checked (two binary searches each, sized by the widest
    interval of the step). That is provably the same as the full allowed set when (a) the beam already
    has >= `num_candidates` allowed checked tokens, or (b) the beam's best unchecked score, beam_score +
    the (top_m+1)-th log-prob, is below the `num_candidates`-th best checked score of its query (the true
    threshold can only be higher);
  * a live beam meeting neither enumerates its interval's distinct continuations by jumping: read the
    next `enum_window` suffixes' tokens (all of them are continuations), then binary-search the end of
    the last one's block and continue there, at most `enum_iters` rounds; each round finds at least one
    new token, so the set is complete whenever the cursor reaches the interval's end;
  * only a beam whose interval is still not exhausted gets the full check over the whole vocabulary,
    in chunks of `fallback_chunk` beams inside a `lax.while_loop`.
The enumeration and the full check run on the compacted list of beams that need them, so their cost is
paid per such beam, and every check of a large interval sits in one `lax.cond`, skipped on steps
with no large interval. (Exact ties in score between a checked and an unchecked token are the one case where
the chosen token may differ; they do not occur with continuous log-probs.)

Loop shapes per platform (`static_searches`, default: on for every backend but CPU). XLA:CPU runs a
`lax.while_loop` on the host thread at no extra cost, so binary searches run only as many rounds as
the widest interval of the call needs (a traced count). XLA:GPU reads each while loop's predicate back
to the host every round (on an H200 these shapes cut the n-gram overhead at beam 20 from +33% to +5%,
docs/benchmarks.md); there every binary search runs a static round count (`search_rounds`: enough for
the corpus's most frequent token, which bounds every interval below the root), unrolled into
straight-line gathers; the top-M check takes all rows in one chunk (the fallback 64 rows at a time),
and the jump enumeration is off (`enum_iters=0`: its rounds are host read-backs there; the rows it
would take get the full check). Both give the same results.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax.decoding.constraints import (NEG_INF, TOPK_BLOCK, block_top_k, interval_iters, lower_bound,
                                             next_pow2, pad_to, search_iters, top_k)
from genret_jax.decoding import suffix_array
from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.errors import InputError

# The bigram bit table costs V * V / 8 bytes: 8 MiB at V = 8,192, 128 MiB at T5's 32,128.
DEFAULT_PAIR_BUDGET_BYTES = 64 << 20


@flax.struct.dataclass
class SubstringState:
  lo: jax.Array      # [N] int32
  hi: jax.Array      # [N] int32
  depth: jax.Array   # [N] int32, n-gram length so far


@flax.struct.dataclass
class SubstringConstraint:
  """Device-side suffix-array constraint (see the module docstring). Build with `from_index`."""

  text: jax.Array            # [Tp] uint16/int32 corpus tokens + separators, padded with separators
  sa: jax.Array              # [Tp] int32 suffix array, padded (padding rows never inside an interval)
  num_suffixes: jax.Array    # scalar int32: real text length (root interval is [0, num_suffixes))
  root_allowed: jax.Array    # [V] bool: tokens that occur as n-gram content (the depth-0 allowed set)
  unigram_lo: jax.Array      # [V + 1] int32: token t's depth-1 interval is [unigram_lo[t], unigram_lo[t+1])
  pair_bits: jax.Array       # [V, ceil(V/8)] uint8 bigram bits (bit b of row a: "a b" occurs), or [1, 1]
  vocab_size: int = flax.struct.field(pytree_node=False)
  sep_id: int = flax.struct.field(pytree_node=False)
  eos_id: int = flax.struct.field(pytree_node=False)
  allow_eos: bool = flax.struct.field(pytree_node=False, default=True)
  top_m: int = flax.struct.field(pytree_node=False, default=64)
  small_interval: int = flax.struct.field(pytree_node=False, default=64)
  fallback_chunk: int = flax.struct.field(pytree_node=False, default=8)
  enum_window: int = flax.struct.field(pytree_node=False, default=64)
  enum_iters: int = flax.struct.field(pytree_node=False, default=64)
  enum_chunk: int = flax.struct.field(pytree_node=False, default=64)
  topk_block: int = flax.struct.field(pytree_node=False, default=TOPK_BLOCK)
  has_pairs: bool = flax.struct.field(pytree_node=False, default=False)
  static_searches: bool = flax.struct.field(pytree_node=False, default=False)
  sparse_steps: bool = flax.struct.field(pytree_node=False, default=True)
  search_rounds: int = flax.struct.field(pytree_node=False, default=32)
  truncated_is_valid: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def from_index(cls, index: SuffixArrayIndex, *, vocab_size: int, eos_id: int, allow_eos: bool = True,
                 top_m: int = 64, small_interval: int = 64, fallback_chunk: int | None = None,
                 enum_window: int = 64, enum_iters: int | None = None, enum_chunk: int | None = None,
                 topk_block: int = TOPK_BLOCK, pair_budget_bytes: int = DEFAULT_PAIR_BUDGET_BYTES,
                 bucket: bool = True, capacity: int = 0, static_searches: bool | None = None) -> "SubstringConstraint":
    """Copies a host index to device arrays, with the depth-0 mask, the depth-1 interval table and
    (when V * V / 8 bytes fit `pair_budget_bytes`) the bigram bit table. `bucket` pads the text to a
    power of two (at least `capacity`) so corpora of similar size share one compiled search.
    `static_searches` (None: on unless the default backend is CPU) picks the loop shapes described in
    the module docstring; `fallback_chunk` / `enum_chunk` / `enum_iters` default to 8 / 64 rows / 64 rounds
    with traced searches and 64 / 1024 rows / 0 rounds (no enumeration) with static ones. `topk_block` bounds
    the block width of the top-M check's per-row top-k pre-selection (`block_top_k`; 0: one top-k over the
    vocabulary)."""
    if index.num_tokens >= suffix_array.MAX_INT32_TOKENS:
      raise InputError(f"the index has {index.num_tokens:,} tokens; one device shard addresses at most "
                       f"{suffix_array.MAX_INT32_TOKENS - 1:,}: split it into shards (ShardedSubstringConstraint; "
                       "genret retrieve: INDEX_SHARDS)", key="index_shards")
    if static_searches is None:
      static_searches = jax.default_backend() != "cpu"
    if fallback_chunk is None:
      fallback_chunk = 64 if static_searches else 8
    if enum_chunk is None:
      enum_chunk = 1024 if static_searches else 64
    if enum_iters is None:
      # Each jump round is a data-dependent loop round, which XLA:GPU pays with a host read-back: skipping
      # the enumeration (its rows go to the full check) cut the biased search's H200 overhead
      # from +111% to +83% at beam 20 (session 13, same rounds); on CPU the rounds cost nothing.
      enum_iters = 0 if static_searches else 64
    t = index.num_tokens
    v = int(vocab_size)
    size = next_pow2(t + 1, capacity) if bucket else max(t + 1, capacity)
    tokens = np.asarray(index.tokens)
    # Pad with separators: an interval never grows past a separator, so padding is never read as content.
    text = pad_to(tokens, size, index.sep_id)
    sa = pad_to(np.asarray(index.sa, dtype=np.int32), size, t)
    tok = tokens.astype(np.int64)
    content = (tok != index.sep_id) & (tok != eos_id) & (tok < v)
    counts = np.bincount(tok[content], minlength=v)[:v]
    root_allowed = counts > 0
    # Suffixes are sorted by first token, so token t's rows follow those of every smaller id (the
    # separator and EOS included: their rows are counted but never used as an interval).
    all_counts = np.bincount(tok, minlength=v + 1)[:v + 1] if t else np.zeros(v + 1, np.int64)
    unigram_lo = np.zeros(v + 1, np.int64)
    np.cumsum(all_counts[:v], out=unigram_lo[1:])
    unigram_lo = np.minimum(unigram_lo, t)
    # Every interval below the root lies inside one content token's unigram interval.
    search_rounds = max(1, int(counts.max(initial=0)).bit_length())
    has_pairs = v * ((v + 7) // 8) <= pair_budget_bytes
    if has_pairs:
      pair_bits = np.zeros((v, (v + 7) // 8), np.uint8)
      ok = content[:-1] & content[1:]
      codes = np.unique(tok[:-1][ok] * v + tok[1:][ok])
      a, b = codes // v, codes % v
      np.bitwise_or.at(pair_bits, (a, b >> 3), (1 << (b & 7)).astype(np.uint8))
    else:
      pair_bits = np.zeros((1, 1), np.uint8)
    return cls(text=jnp.asarray(text), sa=jnp.asarray(sa), num_suffixes=jnp.asarray(t, jnp.int32),
               root_allowed=jnp.asarray(root_allowed), unigram_lo=jnp.asarray(unigram_lo, jnp.int32),
               pair_bits=jnp.asarray(pair_bits), vocab_size=v, sep_id=int(index.sep_id),
               eos_id=int(eos_id), allow_eos=bool(allow_eos), top_m=int(min(top_m, v)),
               small_interval=int(small_interval), fallback_chunk=int(fallback_chunk),
               enum_window=int(max(enum_window, 1)), enum_iters=int(max(enum_iters, 0)),
               enum_chunk=int(max(enum_chunk, 1)), topk_block=int(max(topk_block, 0)),
               has_pairs=bool(has_pairs), static_searches=bool(static_searches), search_rounds=search_rounds)

  @property
  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in (self.text, self.sa, self.root_allowed, self.unigram_lo,
                                      self.pair_bits)))

  # --- helpers ------------------------------------------------------------------------------------

  @property
  def _iters(self) -> int:
    return search_iters(self.sa.shape[0])

  def _rounds(self, sizes):
    """Binary-search rounds for intervals below the root of at most `sizes` suffixes."""
    return self.search_rounds if self.static_searches else interval_iters(sizes)

  def _key(self, depth):
    """Token at offset `depth` of suffix row i (depth broadcasts against i)."""
    def key(i):
      pos = jnp.take(self.sa, i, mode="clip") + depth
      return jnp.take(self.text, pos, mode="clip").astype(jnp.int32)
    return key

  def _content_ok(self, tok):
    return (tok != self.sep_id) & (tok != self.eos_id) & (tok >= 0) & (tok < self.vocab_size)

  def _eos_ok(self, state):
    return self.allow_eos & (state.depth >= 1) & (state.hi > state.lo)

  def _lower_bound(self, key, lo, hi, target, num_iters):
    return lower_bound(key, lo, hi, target, num_iters, unroll=self.static_searches or None)

  def _narrow(self, lo, hi, depth, tok, num_iters):
    key = self._key(depth)
    new_lo = self._lower_bound(key, lo, hi, tok, num_iters)
    new_hi = self._lower_bound(key, new_lo, hi, tok + 1, num_iters)
    return new_lo, new_hi

  def _full_mask(self, state, log_probs, below_root: bool = False):
    """Exact mask over the whole vocabulary: V+1 binary searches per row (`below_root`: no row is at
    depth 0, so static searches need only `search_rounds`)."""
    v = log_probs.shape[1]
    t = jnp.arange(v + 1, dtype=jnp.int32)[None, :]
    rounds = self._rounds(state.hi - state.lo) if below_root else (
        self._iters if self.static_searches else interval_iters(state.hi - state.lo))
    bounds = self._lower_bound(self._key(state.depth[:, None]), state.lo[:, None], state.hi[:, None], t,
                               rounds)
    allowed = (bounds[:, 1:] > bounds[:, :-1]) & self._content_ok(t[:, :-1])
    masked = jnp.where(allowed, log_probs, NEG_INF)
    eos = jnp.where(self._eos_ok(state), log_probs[:, self.eos_id], NEG_INF)
    return masked.at[:, self.eos_id].set(eos)

  def _dense_allowed(self, state, v):
    """[N, V] exact allowed content tokens of rows at depth 0 (and depth 1 with the bigram table)."""
    allowed = (state.depth == 0)[:, None] & self.root_allowed[None, :v]
    if self.has_pairs:
      first = self._key(0)(state.lo)           # the n-gram's only token, for depth-1 rows
      row = jnp.take(self.pair_bits, jnp.clip(first, 0, self.pair_bits.shape[0] - 1), axis=0)
      bits = jnp.unpackbits(row, axis=-1, bitorder="little")[:, :v].astype(bool)
      at_pair = (state.depth == 1) & (state.hi > state.lo)
      allowed = allowed | (at_pair[:, None] & bits)
    return allowed

  def _is_dense(self, state):
    return (state.depth == 0) | ((state.depth == 1) & self.has_pairs)

  def _interval_tokens(self, state, size, v):
    """[N, small_interval] distinct content tokens that follow the first `size` (<= small_interval)
    suffixes of each row's interval, ascending, `v` in unused slots. The suffixes are sorted, so a change
    of next token marks a new one; with size == hi - lo this is the row's complete allowed content."""
    n = size.shape[0]
    r = jnp.arange(self.small_interval, dtype=jnp.int32)[None, :]
    inside = r < size[:, None]
    nxt = jnp.where(inside, self._key(state.depth[:, None])(state.lo[:, None] + r), -1)
    first = inside & jnp.concatenate([jnp.ones((n, 1), bool), nxt[:, 1:] != nxt[:, :-1]], axis=1)
    return jnp.where(first & self._content_ok(nxt), nxt, v)

  # --- protocol -----------------------------------------------------------------------------------

  def init_state(self, num_rows: int) -> SubstringState:
    z = jnp.zeros((num_rows,), jnp.int32)
    return SubstringState(lo=z, hi=jnp.full((num_rows,), self.num_suffixes, jnp.int32), depth=z)

  def advance(self, state: SubstringState, tokens: jax.Array) -> SubstringState:
    tokens = tokens.astype(jnp.int32)
    content = self._content_ok(tokens)
    # From the root the interval is a table lookup; deeper ones are binary searches sized by the widest
    # deeper interval (a unigram's or bigram's count, far below the corpus size).
    at_root = state.depth == 0
    safe = jnp.clip(tokens, 0, self.vocab_size - 1)
    root_lo = jnp.take(self.unigram_lo, safe)
    root_hi = jnp.take(self.unigram_lo, safe + 1)
    deep_hi = jnp.where(at_root, state.lo, state.hi)
    new_lo, new_hi = self._narrow(state.lo, deep_hi, state.depth, tokens,
                                  self._rounds(deep_hi - state.lo))
    new_lo = jnp.where(at_root, root_lo, new_lo)
    new_hi = jnp.where(at_root, root_hi, new_hi)
    # EOS (or any non-content token) closes the n-gram: the state becomes empty.
    return SubstringState(lo=jnp.where(content, new_lo, state.lo),
                          hi=jnp.where(content, new_hi, state.lo), depth=state.depth + 1)

  def count(self, state: SubstringState) -> jax.Array:
    return jnp.where(state.depth >= 1, state.hi - state.lo, 0)

  def sparse_allowed(self, state, beam_scores):
    """(tokens [N, small_interval + 1], usable): when no live row is at a table depth (0, or 1 with the
    bigram table) and every live row's interval has at most `small_interval` suffixes (most steps past
    the second), each row's allowed set is small and read directly: its interval's next tokens and EOS."""
    v = self.vocab_size
    live = beam_scores > NEG_INF / 2
    size = jnp.where(live, state.hi - state.lo, 0)
    usable = self.sparse_steps & ~jnp.any(live & (self._is_dense(state) | (size > self.small_interval)))
    eos = jnp.where(self._eos_ok(state), self.eos_id, v)
    return jnp.concatenate([self._interval_tokens(state, size, v), eos[:, None]], axis=1), usable

  def mask_log_probs(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    masked, large, eos_lp = self.exact_rows_mask(state, log_probs, beam_scores)
    check = lambda m: self.check_large(state, log_probs, beam_scores, m, large, eos_lp, num_beams=num_beams,
                                       num_candidates=num_candidates)
    # One branch holds every loop: steps whose rows all have exact sets already (most steps of a
    # typical n-gram search) pay one predicate, not one per loop.
    return jax.lax.cond(jnp.any(large), check, lambda m: m, masked)

  def check_large(self, state, log_probs, beam_scores, masked, large, eos_lp, *, num_beams, num_candidates):
    """Completes `exact_rows_mask`'s result for the large rows: the top-M check, then the enumeration and
    the full check for the rows it cannot prove unaffected."""
    masked, need = self.check_large_rows(state, log_probs, beam_scores, masked, large, eos_lp,
                                         num_beams=num_beams, num_candidates=num_candidates)
    masked, done = self.apply_enumeration(state, log_probs, masked, need)
    return self.apply_fallback(state, log_probs, masked, need & ~done)

  def exact_rows_mask(self, state, log_probs, beam_scores):
    """The checks that need no search: depth 0 and 1 from the tables, small intervals read directly.
    Returns (masked log-probs, large: live rows whose interval is too large to read, EOS log-probs)."""
    n, v = log_probs.shape
    rows = jnp.arange(n)[:, None]
    live = beam_scores > NEG_INF / 2
    dense = self._is_dense(state)
    size = jnp.where(live & ~dense, state.hi - state.lo, 0)
    small = size <= self.small_interval
    large = ~small
    eos_ok = self._eos_ok(state)
    eos_lp = jnp.where(eos_ok, log_probs[:, self.eos_id], NEG_INF)

    # Depth 0 / 1: precomputed exact sets.
    dense_ok = self._dense_allowed(state, v)
    masked = jnp.where(dense_ok, log_probs, NEG_INF)

    # Small intervals (and the first suffixes of large ones): the tokens read from the suffix array.
    a_tok = self._interval_tokens(state, size, v)
    a_lp = jnp.take_along_axis(log_probs, jnp.clip(a_tok, 0, v - 1), axis=1)
    masked = masked.at[jnp.broadcast_to(rows, a_tok.shape), a_tok].set(a_lp, mode="drop")
    masked = masked.at[:, self.eos_id].set(eos_lp)
    return masked, large, eos_lp

  def check_large_rows(self, state, log_probs, beam_scores, masked, large, eos_lp, *, num_beams,
                       num_candidates):
    """Checks the model's top-M tokens of the large rows (compacted, `enum_chunk` rows at a time: a
    per-row top-k over the vocabulary is one of the dearest ops on CPU) and flags the rows the check
    cannot prove unaffected. Returns (masked log-probs, rows that need enumeration)."""
    n, v = log_probs.shape
    m = self.top_m
    if m >= v:   # every token is a candidate: check them all
      return masked, large
    chunk = min(self.enum_chunk, n)
    padded = -(-n // chunk) * chunk
    idx = jnp.nonzero(large, size=padded, fill_value=n)[0]
    num = large.sum()
    size = jnp.where(large, state.hi - state.lo, 0)
    iters = self._rounds(size)

    def body(carry):
      c, masked, chk, nxt = carry
      sel = jax.lax.dynamic_slice(idx, (c * chunk,), (chunk,))
      safe = jnp.minimum(sel, n - 1)
      top_lp, top_tok = block_top_k(log_probs[safe], m + 1, block=self.topk_block)
      b_tok, b_lp = top_tok[:, :m], top_lp[:, :m]
      lo, depth = state.lo[safe], state.depth[safe]
      hi = jnp.where(sel < n, state.hi[safe], lo)
      lo2, hi2 = self._narrow(lo[:, None], hi[:, None], depth[:, None], b_tok, iters)
      b_ok = (hi2 > lo2) & self._content_ok(b_tok)
      rows = jnp.broadcast_to(sel[:, None], b_tok.shape)
      masked = masked.at[rows, jnp.where(b_ok, b_tok, v)].set(b_lp, mode="drop")
      chk = chk.at[sel].set(jnp.where(b_ok, b_lp, NEG_INF), mode="drop")
      nxt = nxt.at[sel].set(top_lp[:, m], mode="drop")
      return c + 1, masked, chk, nxt

    init = (jnp.int32(0), masked, jnp.full((n, m), NEG_INF, log_probs.dtype),
            jnp.full((n,), NEG_INF, log_probs.dtype))
    _, masked, chk, nxt = _chunk_loop(body, init, chunk, n, num, self.static_searches)

    # Per query, the num_candidates-th best of a subset of the truly allowed scores is a lower bound
    # of the true threshold, so testing against it never skips a row that matters. The subset: the
    # large rows' allowed checked tokens and EOS, and the best two of every other (exact) row.
    exact = jnp.where(large[:, None], NEG_INF, masked)
    best1 = exact.max(axis=1)
    arg1 = jnp.argmax(exact, axis=1)
    best2 = jnp.where(jnp.arange(v)[None, :] == arg1[:, None], NEG_INF, exact).max(axis=1)
    checked = jnp.concatenate([chk, best1[:, None], best2[:, None],
                               jnp.where(large, eos_lp, NEG_INF)[:, None]], axis=1)
    checked = jnp.where(checked > NEG_INF / 2, checked + beam_scores[:, None], NEG_INF)
    per_query = checked.reshape(n // num_beams, -1)
    k = min(num_candidates, per_query.shape[1])
    threshold = jnp.repeat(top_k(per_query, k)[0][:, -1], num_beams)
    # (a) enough allowed among the checked tokens, or (b) the best unchecked cannot reach the
    # query's num_candidates-th best checked score.
    num_ok = (chk > NEG_INF / 2).sum(axis=1) + (eos_lp > NEG_INF / 2).astype(jnp.int32)
    best_unchecked = beam_scores + nxt
    need = large & (num_ok < num_candidates) & (best_unchecked >= threshold)
    return masked, need

  def apply_enumeration(self, state, log_probs, masked, need):
    """Adds the distinct continuations of the rows in `need` by jumping through their intervals,
    `enum_chunk` rows at a time. Returns (masked, done): `done` rows now have their exact allowed set."""
    n, v = log_probs.shape
    if self.enum_iters == 0:
      return masked, jnp.zeros((n,), bool)
    chunk = min(self.enum_chunk, n)
    padded = -(-n // chunk) * chunk
    idx = jnp.nonzero(need, size=padded, fill_value=n)[0]
    num = need.sum()
    w = jnp.arange(self.enum_window, dtype=jnp.int32)[None, :]

    def chunk_body(carry):
      c, masked, done = carry
      sel = jax.lax.dynamic_slice(idx, (c * chunk,), (chunk,))
      safe = jnp.minimum(sel, n - 1)
      active = sel < n
      lo, depth = state.lo[safe], state.depth[safe]
      hi = jnp.where(active, state.hi[safe], lo)
      key = self._key(depth)
      local = jnp.broadcast_to(jnp.arange(chunk)[:, None], (chunk, self.enum_window))

      def jump_cond(inner):
        it, p, _ = inner
        return (it < self.enum_iters) & jnp.any(p < hi)

      # The jumps mark a [chunk, V] bitmap, not the [N, V] log-probs: a while loop carrying the big
      # array may copy it every round on CPU.
      def jump_body(inner):
        it, p, found = inner
        pos = p[:, None] + w
        ok = pos < hi[:, None]
        tok = jnp.where(ok, self._key(depth[:, None])(pos), -1)   # every one is a continuation
        ok = ok & self._content_ok(tok)
        found = found.at[local, jnp.where(ok, tok, v)].set(True, mode="drop")
        # Skip the rest of the last read token's block: the next row starts a new token.
        last = jnp.minimum(p + self.enum_window, hi) - 1
        live = p < hi
        last = jnp.where(live, last, p)
        end_hi = jnp.where(live, hi, p)
        nxt = self._lower_bound(key, last, end_hi, key(last) + 1, self._rounds(end_hi - last))
        return it + 1, jnp.where(live, nxt, p), found

      _, p, found = jax.lax.while_loop(jump_cond, jump_body,
                                       (jnp.int32(0), lo, jnp.zeros((chunk, v), bool)))
      rows = jnp.where(found, log_probs[safe], masked[safe])
      masked = masked.at[sel].set(rows, mode="drop")
      done = done.at[sel].set(p >= hi, mode="drop")
      return c + 1, masked, done

    _, masked, done = _chunk_loop(chunk_body, (jnp.int32(0), masked, jnp.zeros((n,), bool)), chunk, n, num,
                       self.static_searches)
    return masked, done

  def apply_fallback(self, state, log_probs, masked, need):
    """Replaces the rows in `need` with the exact full-vocabulary mask, `fallback_chunk` rows at a time."""
    n = log_probs.shape[0]
    chunk = min(self.fallback_chunk, n)
    padded = -(-n // chunk) * chunk
    idx = jnp.nonzero(need, size=padded, fill_value=n)[0]
    num = need.sum()

    def body(carry):
      i, masked = carry
      sel = jax.lax.dynamic_slice(idx, (i * chunk,), (chunk,))
      safe = jnp.minimum(sel, n - 1)
      sub = jax.tree.map(lambda x: x[safe], state)
      sub = sub.replace(hi=jnp.where(sel < n, sub.hi, sub.lo))
      full = self._full_mask(sub, log_probs[safe], below_root=True)
      return i + 1, masked.at[sel].set(full, mode="drop")

    _, masked = _chunk_loop(body, (jnp.int32(0), masked), chunk, n, num, self.static_searches)
    return masked


def _chunk_loop(body, init, chunk, n, num, loop_free):
  """Runs `body` over the compacted rows `chunk` at a time while chunks remain (`num` rows in all). With
  `loop_free` (the accelerator shapes) one chunk covering every row runs once, unconditionally: no predicate
  read back to the host; on CPU the loop skips the body when no row needs it, which is cheaper."""
  if loop_free and chunk >= n:
    return body(init)
  return jax.lax.while_loop(lambda c: c[0] * chunk < num, body, init)
