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

Exactness with bounded work. Checking all V tokens per beam costs V binary searches, so each step:
  * a beam whose interval holds at most `small_interval` suffixes reads their next tokens directly:
    that is its complete allowed set;
  * otherwise only the model's top `top_m` tokens are checked. The result is provably the same as with
    the full allowed set when (a) the beam already has >= `num_candidates` allowed checked tokens (any
    unchecked token ranks below them), or (b) the beam's best unchecked score, beam_score + the
    (top_m+1)-th log-prob, is below the `num_candidates`-th best checked score of its query (the true
    threshold can only be higher). A live beam meeting neither gets the full check over the whole
    vocabulary, in chunks of `fallback_chunk` beams inside a `lax.while_loop`, so the cost is paid only
    for the beams that need it. (Exact ties in score between a checked and an unchecked token are the one
    case where the chosen token may differ; they do not occur with continuous log-probs.)
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax.decoding.constraints import NEG_INF, lower_bound, next_pow2, pad_to, search_iters
from genret_jax.decoding.suffix_array import SuffixArrayIndex


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
  vocab_size: int = flax.struct.field(pytree_node=False)
  sep_id: int = flax.struct.field(pytree_node=False)
  eos_id: int = flax.struct.field(pytree_node=False)
  allow_eos: bool = flax.struct.field(pytree_node=False, default=True)
  top_m: int = flax.struct.field(pytree_node=False, default=64)
  small_interval: int = flax.struct.field(pytree_node=False, default=64)
  fallback_chunk: int = flax.struct.field(pytree_node=False, default=8)
  truncated_is_valid: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def from_index(cls, index: SuffixArrayIndex, *, vocab_size: int, eos_id: int, allow_eos: bool = True,
                 top_m: int = 64, small_interval: int = 64, fallback_chunk: int = 8,
                 bucket: bool = True, capacity: int = 0) -> "SubstringConstraint":
    """Copies a host index to device arrays. `bucket` pads the text to a power of two (at least
    `capacity`) so corpora of similar size share one compiled search."""
    t = index.num_tokens
    size = next_pow2(t + 1, capacity) if bucket else max(t + 1, capacity)
    # Pad with separators: an interval never grows past a separator, so padding is never read as content.
    text = pad_to(np.asarray(index.tokens), size, index.sep_id)
    sa = pad_to(np.asarray(index.sa, dtype=np.int32), size, t)
    return cls(text=jnp.asarray(text), sa=jnp.asarray(sa), num_suffixes=jnp.asarray(t, jnp.int32),
               vocab_size=int(vocab_size), sep_id=int(index.sep_id), eos_id=int(eos_id),
               allow_eos=bool(allow_eos), top_m=int(min(top_m, vocab_size)),
               small_interval=int(small_interval), fallback_chunk=int(fallback_chunk))

  @property
  def nbytes(self) -> int:
    return int(self.text.nbytes + self.sa.nbytes)

  # --- helpers ------------------------------------------------------------------------------------

  @property
  def _iters(self) -> int:
    return search_iters(self.sa.shape[0])

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

  def _narrow(self, lo, hi, depth, tok):
    key = self._key(depth)
    new_lo = lower_bound(key, lo, hi, tok, self._iters)
    new_hi = lower_bound(key, new_lo, hi, tok + 1, self._iters)
    return new_lo, new_hi

  def _full_mask(self, state, log_probs):
    """Exact mask over the whole vocabulary: V+1 binary searches per row."""
    v = log_probs.shape[1]
    t = jnp.arange(v + 1, dtype=jnp.int32)[None, :]
    bounds = lower_bound(self._key(state.depth[:, None]), state.lo[:, None], state.hi[:, None], t,
                         self._iters)
    allowed = (bounds[:, 1:] > bounds[:, :-1]) & self._content_ok(t[:, :-1])
    masked = jnp.where(allowed, log_probs, NEG_INF)
    eos = jnp.where(self._eos_ok(state), log_probs[:, self.eos_id], NEG_INF)
    return masked.at[:, self.eos_id].set(eos)

  # --- protocol -----------------------------------------------------------------------------------

  def init_state(self, num_rows: int) -> SubstringState:
    z = jnp.zeros((num_rows,), jnp.int32)
    return SubstringState(lo=z, hi=jnp.full((num_rows,), self.num_suffixes, jnp.int32), depth=z)

  def advance(self, state: SubstringState, tokens: jax.Array) -> SubstringState:
    tokens = tokens.astype(jnp.int32)
    new_lo, new_hi = self._narrow(state.lo, state.hi, state.depth, tokens)
    content = self._content_ok(tokens)
    # EOS (or any non-content token) closes the n-gram: the state becomes empty.
    return SubstringState(lo=jnp.where(content, new_lo, state.lo),
                          hi=jnp.where(content, new_hi, state.lo), depth=state.depth + 1)

  def count(self, state: SubstringState) -> jax.Array:
    return jnp.where(state.depth >= 1, state.hi - state.lo, 0)

  def mask_log_probs(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    n, v = log_probs.shape
    masked, need = self.checked_mask(state, log_probs, beam_scores, num_beams=num_beams,
                                     num_candidates=num_candidates)
    return self.apply_fallback(state, log_probs, masked, need)

  def checked_mask(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    """The bounded check. Returns (masked log-probs, rows that need the full check)."""
    n, v = log_probs.shape
    rows = jnp.arange(n)[:, None]
    size = state.hi - state.lo
    live = beam_scores > NEG_INF / 2
    small = size <= self.small_interval

    # Small intervals: the next tokens of all their suffixes (sorted, so a change marks a new token).
    r = jnp.arange(self.small_interval, dtype=jnp.int32)[None, :]
    inside = r < size[:, None]
    nxt = jnp.where(inside, self._key(state.depth[:, None])(state.lo[:, None] + r), -1)
    first = inside & jnp.concatenate([jnp.ones((n, 1), bool), nxt[:, 1:] != nxt[:, :-1]], axis=1)
    a_ok = small[:, None] & first & self._content_ok(nxt)
    a_tok = jnp.where(a_ok, nxt, v)
    a_lp = jnp.take_along_axis(log_probs, jnp.clip(a_tok, 0, v - 1), axis=1)

    # Large intervals: the model's top-M tokens.
    m = self.top_m
    exhaustive = m >= v
    top_lp, top_tok = jax.lax.top_k(log_probs, m if exhaustive else m + 1)
    b_tok, b_lp = top_tok[:, :m], top_lp[:, :m]
    lo2, hi2 = self._narrow(state.lo[:, None], state.hi[:, None], state.depth[:, None], b_tok)
    b_ok = ~small[:, None] & (hi2 > lo2) & self._content_ok(b_tok)

    eos_ok = self._eos_ok(state)
    masked = jnp.full_like(log_probs, NEG_INF)
    masked = masked.at[jnp.broadcast_to(rows, a_tok.shape), a_tok].set(a_lp, mode="drop")
    masked = masked.at[jnp.broadcast_to(rows, b_tok.shape), jnp.where(b_ok, b_tok, v)].set(
        b_lp, mode="drop")
    masked = masked.at[:, self.eos_id].set(jnp.where(eos_ok, log_probs[:, self.eos_id], NEG_INF))

    if exhaustive:
      return masked, jnp.zeros((n,), bool)
    # (a) enough allowed among the checked tokens, or (b) the best unchecked cannot reach the query's
    # num_candidates-th best checked score.
    num_ok = b_ok.sum(axis=1) + eos_ok.astype(jnp.int32)
    checked = jnp.concatenate([jnp.where(a_ok, a_lp, NEG_INF), jnp.where(b_ok, b_lp, NEG_INF),
                               jnp.where(eos_ok, log_probs[:, self.eos_id], NEG_INF)[:, None]], axis=1)
    checked = checked + beam_scores[:, None]
    per_query = checked.reshape(n // num_beams, -1)
    k = min(num_candidates, per_query.shape[1])
    threshold = jax.lax.top_k(per_query, k)[0][:, -1]
    threshold = jnp.repeat(threshold, num_beams)
    best_unchecked = beam_scores + top_lp[:, m]
    need = live & ~small & (num_ok < num_candidates) & (best_unchecked >= threshold)
    return masked, need

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
      full = self._full_mask(sub, log_probs[safe])
      return i + 1, masked.at[sel].set(full, mode="drop")

    _, masked = jax.lax.while_loop(lambda c: c[0] * chunk < num, body, (jnp.int32(0), masked))
    return masked
