"""The one beam search for both model families, with pluggable constraints (t5x-style, ANCHORS.md §1.5).

`beam_search` is a pure function meant to run under the caller's `jax.jit` (and mesh): a `lax.while_loop`
over decode steps that stops early once no live beam can change any query's top `num_return` (or when
every beam has finished or died). Each step:
  1. `tokens_to_logits(cache, last_tokens [B*K], step)` -> logits [B*K, V]; log-softmax in float32;
  2. the constraint masks the log-probs (exactly; see `constraints.py`);
  3. the top 2K candidates over beam x vocab per query (2K so EOS hits never starve the live set),
     pre-selected by block maxima (`candidate_top_k`);
     on steps where the constraint lists every live row's few allowed tokens (`sparse_allowed`, e.g. the
     n-gram steps past the bigram level), 2-3 read only those tokens' log-probs instead
     (`sparse_candidate_top_k`): no [B*K, V] mask is written and scanned;
  4. candidates ending in EOS (or reaching max length, where the constraint accepts that) join the
     finished pool with score = log_prob / ((5 + length) / 6) ** alpha (length counts EOS);
     the best K others become the live beams; the per-row cache (except its keys/values, which stay in
     place, `IN_PLACE`) and the constraint state are gathered to them;
  5. with `keep_history`, every valid non-EOS candidate is written to a fixed-size history buffer
     (the reference's `keep_history` keys, without its defects 15-16: masked before the top-k, no
     invalid entries, every entry a distinct n-gram).

Results are distinct by construction: a hypothesis determines its parent, the first step expands one
beam per query, and finished entries differ in content or length. Rows of queries masked out by
`query_mask` (batch padding) start dead and return no valid hypothesis.

Sharding: every per-query array has the batch as its leading axis and beams are gathered with batched
(per-query) gathers, so with queries sharded over `data` the loop runs without cross-device traffic
except the scalar stop test.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax.decoding.constraints import NEG_INF, Unconstrained, batched_take, block_top_k, top_k

PyTree = Any
TokensToLogits = Callable[[PyTree, jax.Array, jax.Array], tuple[jax.Array, PyTree]]


@flax.struct.dataclass
class NgramHistory:
  """Every distinct n-gram that entered a query's candidate set (n-gram mode, `keep_history=True`)."""
  tokens: jax.Array      # [B, H, L] int32, pad after `lengths`
  lengths: jax.Array     # [B, H] int32
  log_probs: jax.Array   # [B, H] float32, cumulative log-prob of the n-gram
  counts: jax.Array      # [B, H] int32, corpus count (constraint.count; -1 if undefined)
  valid: jax.Array       # [B, H] bool


@flax.struct.dataclass
class BeamSearchOutput:
  """Top `num_return` finished hypotheses per query, best first."""
  tokens: jax.Array        # [B, R, L] int32 identifier tokens without EOS, `pad_id` after `lengths`
  lengths: jax.Array       # [B, R] int32, identifier length (EOS not counted)
  scores: jax.Array        # [B, R] float32, length-penalised log-prob (the ranking score)
  log_probs: jax.Array     # [B, R] float32, cumulative log-prob (EOS included)
  ended_by_eos: jax.Array  # [B, R] bool (False: cut at max_decode_len, where the constraint allows it)
  valid: jax.Array         # [B, R] bool; invalid entries pad queries with fewer than R results
  counts: jax.Array        # [B, R] int32, constraint.count of the hypothesis (-1 if undefined)
  num_steps: jax.Array     # scalar int32, decode steps actually run
  history: Optional[NgramHistory] = None


def length_penalty(length, alpha: float):
  """Wu et al. (2016) / t5x brevity penalty ((5 + length) / 6) ** alpha; 1 when alpha == 0."""
  if alpha == 0.0:
    return jnp.ones_like(jnp.asarray(length, jnp.float32))
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree: PyTree, idx: jax.Array, batch: int, width: int) -> PyTree:
  """Per-query gather on a pytree whose leaves have `batch * width` leading rows: row (b, idx[b, j])
  -> row (b, j). A batched gather, so a batch sharded over devices stays local."""
  out_width = idx.shape[1]

  def one(x):
    x = x.reshape((batch, width) + x.shape[1:])
    y = jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0, mode="clip"))(x, idx)
    return y.reshape((batch * out_width,) + x.shape[2:])

  return jax.tree.map(one, tree)


# Cache entry whose leaves keep one row per query (the same for every beam): never repeated or gathered.
PER_QUERY = "per_query"
# Cache entry whose leaves have one row per beam but are never gathered: the model leaves them where each row wrote
# them and reads a reordered beam's history through per-row indices it keeps in the gathered entries
# (models/layers.py, `cache_rows`).
IN_PLACE = "in_place"


def _map_beam_rows(fn: Callable[[PyTree], PyTree], cache: PyTree, keep: tuple[str, ...]) -> PyTree:
  """Applies `fn` to the cache except its entries named in `keep`."""
  if isinstance(cache, dict) and any(key in cache for key in keep):
    rest = fn({key: val for key, val in cache.items() if key not in keep})
    return {**rest, **{key: cache[key] for key in keep if key in cache}}
  return fn(cache)


def candidate_top_k(beam_scores: jax.Array, log_probs: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
  """Top `c` of beam_scores[b, j] + log_probs[b, j, t] over each query's K x V candidates: (scores [B, c],
  flat indices j * V + t [B, c]), as `top_k` over the [B, K * V] sums returns them, pre-selected by blocks
  (`block_top_k`: exact; positions can differ only among exactly tied values, which for valid candidates
  needs equal log-probs; invalid ones are NEG_INF-masked and never used)."""
  b, k, v = log_probs.shape
  return block_top_k(log_probs.reshape(b, k * v), c, segment_offsets=beam_scores)


def sparse_candidate_top_k(beam_scores: jax.Array, logits: jax.Array, lse: jax.Array, allowed: jax.Array,
                           c: int) -> tuple[jax.Array, jax.Array]:
  """`candidate_top_k` over the allowed tokens only, when every live row's allowed set is listed in
  `allowed` [B*K, S] (distinct token ids, V in unused slots): the log-probs are read at those S tokens,
  so no [B*K, V] array is written or scanned; the logits are read once, by the logsumexp `lse` [B*K, 1].
  Returns the same (scores, flat indices j * V + t) as `candidate_top_k` over the masked log-probs
  (positions can differ only among exactly tied values)."""
  b, k = beam_scores.shape
  n, v = logits.shape
  width = allowed.shape[1]
  if k * width < c:   # fewer slots than candidates: pad with unused ones
    allowed = jnp.pad(allowed, ((0, 0), (0, -(-c // k) - width)), constant_values=v)
    width = allowed.shape[1]
  safe = jnp.minimum(allowed, v - 1)
  log_probs = jnp.take_along_axis(logits, safe, axis=1) - lse
  scores = jnp.where(allowed < v, log_probs, NEG_INF).reshape(b, k, width) + beam_scores[:, :, None]
  top_scores, pos = top_k(scores.reshape(b, k * width), c)
  tok = jnp.take_along_axis(safe.reshape(b, k * width), pos, axis=1)
  return top_scores, ((pos // width) * v + tok).astype(jnp.int32)


@flax.struct.dataclass
class _State:
  step: jax.Array
  live_seqs: jax.Array       # [B, K, L]
  live_logp: jax.Array       # [B, K]
  last_tokens: jax.Array     # [B*K]
  cstate: PyTree             # [B*K, ...]
  cache: PyTree              # [B*K, ...]
  fin_seqs: jax.Array        # [B, R, L]
  fin_scores: jax.Array      # [B, R]
  fin_logp: jax.Array
  fin_len: jax.Array         # generated length, EOS included
  fin_eos: jax.Array
  fin_count: jax.Array
  history: Optional[NgramHistory]


def beam_search(tokens_to_logits: TokensToLogits, cache: PyTree, first_tokens: jax.Array, *,
                num_beams: int, max_decode_len: int, eos_id: int, pad_id: int = 0, alpha: float = 0.0,
                constraint: Any = None, constraint_state: PyTree = None, num_return: int | None = None,
                keep_history: bool = False, query_mask: jax.Array | None = None) -> BeamSearchOutput:
  """Batched beam search (see the module docstring).

  Args:
    tokens_to_logits: `(cache, tokens [N], step) -> (logits [N, V], cache)`, the model contract with
      params bound (e.g. `functools.partial(model.tokens_to_logits, params)`); `step` is the 0-based
      index of the token being predicted.
    cache: from `decode_init`; every leaf has the batch B as leading axis and is expanded to B*K rows
      here, except under `cache["per_query"]`: those leaves stay [B, ...] (they are the same for all
      beams of a query; the model must accept them, as T5's cross-attention does). Leaves under
      `cache["in_place"]` are expanded but never reordered: the model reads them through indices it keeps in
      the reordered leaves (it must treat the K rows of a query as one group).
    first_tokens: [B] int32, the token fed at step 0 (decoder start / last prompt token).
    num_beams: K (static).
    max_decode_len: maximum generated tokens, EOS included (static).
    eos_id / pad_id: end token; filler for tokens after a hypothesis' end.
    alpha: length-penalty exponent (>= 0; 0 ranks by log-prob).
    constraint: a `Constraint` pytree (`TrieConstraint`, `SubstringConstraint`) or None.
    constraint_state: initial constraint state with leading axis B (default `constraint.init_state`).
    num_return: hypotheses returned per query (default K).
    keep_history: also return every candidate n-gram (`BeamSearchOutput.history`); disables the
      "cannot improve" early stop so the history covers all steps.
    query_mask: [B] bool, False for batch-padding rows (they decode nothing).
  """
  if alpha < 0:
    raise ValueError("alpha must be >= 0 (the early-stop bound assumes the penalty grows with length)")
  constraint = Unconstrained() if constraint is None else constraint
  k, length = int(num_beams), int(max_decode_len)
  r = k if num_return is None else int(num_return)
  first_tokens = jnp.asarray(first_tokens, jnp.int32)
  b = first_tokens.shape[0]
  n = b * k

  expand = lambda x: jnp.repeat(x, k, axis=0)
  cache = _map_beam_rows(lambda c: jax.tree.map(expand, c), cache, keep=(PER_QUERY,))
  cstate = (constraint.init_state(n) if constraint_state is None
            else jax.tree.map(expand, constraint_state))
  # Only beam 0 of each query is live at first, so the K beams never duplicate one prefix.
  init_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  if query_mask is not None:
    init_logp = jnp.where(jnp.asarray(query_mask, bool)[:, None], init_logp, NEG_INF)

  def probe_vocab():
    logits, _ = jax.eval_shape(tokens_to_logits, cache, expand(first_tokens), jnp.int32(0))
    return logits.shape[-1]

  vocab = probe_vocab()
  c = min(2 * k, k * vocab)
  history = None
  if keep_history:
    h = length * c
    history = NgramHistory(tokens=jnp.full((b, h, length), pad_id, jnp.int32),
                           lengths=jnp.zeros((b, h), jnp.int32),
                           log_probs=jnp.full((b, h), NEG_INF, jnp.float32),
                           counts=jnp.zeros((b, h), jnp.int32), valid=jnp.zeros((b, h), bool))
  state = _State(
      step=jnp.int32(0), live_seqs=jnp.full((b, k, length), pad_id, jnp.int32), live_logp=init_logp,
      last_tokens=expand(first_tokens), cstate=cstate, cache=cache,
      fin_seqs=jnp.full((b, r, length), pad_id, jnp.int32),
      fin_scores=jnp.full((b, r), NEG_INF, jnp.float32), fin_logp=jnp.full((b, r), NEG_INF, jnp.float32),
      fin_len=jnp.zeros((b, r), jnp.int32), fin_eos=jnp.zeros((b, r), bool),
      fin_count=jnp.zeros((b, r), jnp.int32), history=history)
  max_penalty = length_penalty(length, alpha)

  def cond(s: _State):
    best_live = s.live_logp.max(axis=1)
    no_live = best_live <= NEG_INF / 2
    done = no_live
    if not keep_history:
      # No live beam can beat the R-th finished even at the most favourable length (t5x's test).
      done = done | (s.fin_scores[:, r - 1] > best_live / max_penalty)
    return (s.step < length) & ~jnp.all(done)

  def body(s: _State) -> _State:
    i = s.step
    logits, cache = tokens_to_logits(s.cache, s.last_tokens, i)
    logits = logits.astype(jnp.float32)
    # logits - logsumexp rather than jax.nn.log_softmax: the latter's (x - max) is fused into the output
    # projection's YNN fusion and materialised once more before the subtraction of log(sum), one extra pass
    # over [B*K, V] per step; this form read 12% faster on the tiny vocab-8,192 beam-20 search (ad-hoc, CPU).
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    row_scores = s.live_logp.reshape(n)

    def dense_candidates(_):
      masked = constraint.mask_log_probs(s.cstate, logits - lse, row_scores, num_beams=k, num_candidates=c)
      return candidate_top_k(s.live_logp, masked.reshape(b, k, vocab), c)

    def sparse_candidates(_):
      allowed = constraint.sparse_allowed(s.cstate, row_scores)[0]
      return sparse_candidate_top_k(s.live_logp, logits, lse, allowed, c)

    if hasattr(constraint, "sparse_allowed"):
      # Only `usable` is kept out here and only the token list inside the sparse branch (XLA drops the unused
      # half of each call), so dense steps do not build a token list they never read.
      usable = constraint.sparse_allowed(s.cstate, row_scores)[1]
      top_scores, top_idx = jax.lax.cond(usable, sparse_candidates, dense_candidates, None)
    else:
      top_scores, top_idx = dense_candidates(None)
    parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    valid = top_scores > NEG_INF / 2
    cand_cstate = constraint.advance(_gather_beams(s.cstate, parent, b, k), tok.reshape(b * c))
    cand_count = constraint.count(cand_cstate).reshape(b, c)
    cand_seqs = batched_take(s.live_seqs, parent)
    cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tok[:, :, None], i, axis=2)
    is_eos = tok == eos_id
    last = i == length - 1

    # Finished candidates, merged into the pool (top_k keeps it sorted, best first).
    new_fin = valid & (is_eos | (last & constraint.truncated_is_valid))
    fin_cand = jnp.where(new_fin, top_scores / length_penalty(i + 1, alpha), NEG_INF)
    pool_scores = jnp.concatenate([s.fin_scores, fin_cand], axis=1)
    fin_scores, sel = top_k(pool_scores, r)
    cat = lambda old, new: batched_take(jnp.concatenate([old, new], axis=1), sel)
    fin_seqs = cat(s.fin_seqs, cand_seqs)
    fin_logp = cat(s.fin_logp, top_scores)
    fin_len = cat(s.fin_len, jnp.full((b, c), i + 1, jnp.int32))
    fin_eos = cat(s.fin_eos, is_eos)
    fin_count = cat(s.fin_count, jnp.where(is_eos, batched_take(constraint.count(s.cstate).reshape(b, k), parent),
                                           cand_count))

    # Live beams: the best K valid non-EOS candidates (none after the last step).
    live_ok = valid & ~is_eos & ~last
    live_logp, live_sel = top_k(jnp.where(live_ok, top_scores, NEG_INF), k)
    live_logp = jnp.where(live_logp > NEG_INF / 2, live_logp, NEG_INF)
    cache_idx = batched_take(parent, live_sel)
    new_cache = _map_beam_rows(lambda c: _gather_beams(c, cache_idx, b, k), cache, keep=(PER_QUERY, IN_PLACE))
    new_cstate = _gather_beams(cand_cstate, live_sel, b, c)

    history = s.history
    if keep_history:
      start = i * c
      upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=1)
      ok = valid & ~is_eos
      history = NgramHistory(tokens=upd(history.tokens, cand_seqs),
                             lengths=upd(history.lengths, jnp.full((b, c), i + 1, jnp.int32)),
                             log_probs=upd(history.log_probs, top_scores),
                             counts=upd(history.counts, cand_count), valid=upd(history.valid, ok))
    return _State(step=i + 1, live_seqs=batched_take(cand_seqs, live_sel), live_logp=live_logp,
                  last_tokens=batched_take(tok, live_sel).reshape(n), cstate=new_cstate, cache=new_cache,
                  fin_seqs=fin_seqs, fin_scores=fin_scores, fin_logp=fin_logp, fin_len=fin_len,
                  fin_eos=fin_eos, fin_count=fin_count, history=history)

  s = jax.lax.while_loop(cond, body, state)
  valid = s.fin_scores > NEG_INF / 2
  ident_len = jnp.where(valid, s.fin_len - s.fin_eos.astype(jnp.int32), 0)
  pos = jnp.arange(length)[None, None, :]
  tokens = jnp.where(pos < ident_len[:, :, None], s.fin_seqs, pad_id)
  hist = s.history
  if hist is not None:
    hist = hist.replace(tokens=jnp.where(jnp.arange(length)[None, None, :] < hist.lengths[:, :, None],
                                         hist.tokens, pad_id))
  return BeamSearchOutput(tokens=tokens, lengths=ident_len, scores=jnp.where(valid, s.fin_scores, NEG_INF),
                          log_probs=jnp.where(valid, s.fin_logp, NEG_INF), ended_by_eos=s.fin_eos & valid,
                          valid=valid, counts=jnp.where(valid, s.fin_count, 0), num_steps=s.step,
                          history=hist)


def hypotheses(out: BeamSearchOutput) -> list[list[tuple[tuple[int, ...], float]]]:
  """Host view: per query, [(identifier tokens, score), ...] of the valid results, best first."""
  tokens, lengths, scores, valid = (np.asarray(x) for x in (out.tokens, out.lengths, out.scores, out.valid))
  return [[(tuple(int(t) for t in tokens[q, j, :lengths[q, j]]), float(scores[q, j]))
           for j in range(tokens.shape[1]) if valid[q, j]] for q in range(tokens.shape[0])]


def ngram_history(out: BeamSearchOutput) -> list[dict[tuple[int, ...], tuple[float, int]]]:
  """Host view of the n-gram history: per query {n-gram: (cumulative log-prob, corpus count)},
  deduplicated (the best log-prob wins if an n-gram was ever recorded twice)."""
  if out.history is None:
    raise ValueError("beam_search was run without keep_history=True")
  h = out.history
  tokens, lengths, logp, counts, valid = (np.asarray(x) for x in
                                          (h.tokens, h.lengths, h.log_probs, h.counts, h.valid))
  result = []
  for q in range(tokens.shape[0]):
    d: dict[tuple[int, ...], tuple[float, int]] = {}
    for j in np.nonzero(valid[q])[0]:
      key = tuple(int(t) for t in tokens[q, j, :lengths[q, j]])
      if key not in d or logp[q, j] > d[key][0]:
        d[key] = (float(logp[q, j]), int(counts[q, j]))
    result.append(d)
  return result
