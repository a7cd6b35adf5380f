"""Straightforward host reference implementations (numpy / pure Python), for tests and benchmark
agreement checks: a beam search that masks with the *true* allowed set of next tokens, and brute-force
allowed-set functions for a set of identifiers (trie) and for corpus substrings.

Same rules as `beam_search`: one live beam per query at step 0; each step the top 2K candidates over
(beam, allowed token) by cumulative log-prob, ties broken by (beam, token) like the flattened top-k;
EOS (or max length, when truncated hypotheses are valid) finishes a candidate with score
log_prob / ((5 + length) / 6) ** alpha; the best K other candidates stay live.
"""

from __future__ import annotations

from typing import Callable, Sequence


AllowedFn = Callable[[tuple[int, ...]], set[int]]


def trie_allowed_fn(identifiers: Sequence[Sequence[int]], eos_id: int) -> AllowedFn:
  seqs = [tuple(s) if (s and s[-1] == eos_id) else tuple(s) + (eos_id,) for s in identifiers]

  def allowed(prefix):
    n = len(prefix)
    return {s[n] for s in seqs if len(s) > n and s[:n] == prefix}

  return allowed


def ngram_count(docs: Sequence[Sequence[int]], ngram: Sequence[int]) -> int:
  ngram = tuple(ngram)
  n = len(ngram)
  if n == 0:
    return 0
  return sum(1 for d in docs for j in range(len(d) - n + 1) if tuple(d[j:j + n]) == ngram)


def substring_allowed_fn(docs: Sequence[Sequence[int]], *, vocab_size: int, sep_id: int, eos_id: int,
                         allow_eos: bool = True) -> AllowedFn:
  docs = [tuple(int(t) for t in d) for d in docs]
  content = lambda t: t != sep_id and t != eos_id and 0 <= t < vocab_size

  def allowed(prefix):
    n = len(prefix)
    out = {d[j + n] for d in docs for j in range(len(d) - n) if d[j:j + n] == prefix}
    out = {t for t in out if content(t)}
    if allow_eos and n >= 1 and ngram_count(docs, prefix) > 0:
      out.add(eos_id)
    return out

  return allowed


def reference_beam_search(step_fn, h0: int, first_token: int, *, num_beams: int, max_decode_len: int,
                          eos_id: int, allowed_fn: AllowedFn | None, vocab_size: int,
                          truncated_is_valid: bool, alpha: float = 0.0, num_return: int | None = None,
                          count_fn: Callable[[tuple[int, ...]], int] | None = None):
  """One query. `step_fn(h, token, step) -> (log_probs [V], h')` (e.g. `FakeModel.np_step`).

  Returns (results, history): results = [(tokens without EOS, score, ended_by_eos)] best first;
  history = {n-gram: (log_prob, count)} of every valid non-EOS candidate.
  """
  k, r = num_beams, num_return or num_beams
  c = min(2 * k, k * vocab_size)
  penalty = lambda n: ((5.0 + n) / 6.0) ** alpha
  live = [((), 0.0, h0)]
  finished, history = [], {}
  for i in range(max_decode_len):
    if not live:
      break
    cands = []
    for bi, (seq, lp, h) in enumerate(live):
      logp, h2 = step_fn(h, seq[-1] if seq else first_token, i)
      allowed = range(vocab_size) if allowed_fn is None else allowed_fn(seq)
      for t in sorted(allowed):
        cands.append((lp + float(logp[t]), bi, t, seq + (t,), h2))
    cands.sort(key=lambda x: (-x[0], x[1], x[2]))
    cands = cands[:c]
    last = i == max_decode_len - 1
    for score, _, t, seq, _ in cands:
      if t == eos_id:
        finished.append((seq[:-1], score / penalty(i + 1), True))
      else:
        history[seq] = (score, count_fn(seq) if count_fn else -1)
        if last and truncated_is_valid:
          finished.append((seq, score / penalty(i + 1), False))
    live = [] if last else [(seq, score, h) for score, _, t, seq, h in cands if t != eos_id][:k]
  finished.sort(key=lambda x: -x[1])
  return finished[:r], history


def exhaustive_scores(step_fn, h0: int, first_token: int, identifiers: Sequence[Sequence[int]], *,
                      eos_id: int, alpha: float = 0.0) -> dict[tuple[int, ...], float]:
  """Score of every identifier (EOS appended when missing) under the model, with the length penalty."""
  out = {}
  for ident in identifiers:
    seq = tuple(ident) if (ident and ident[-1] == eos_id) else tuple(ident) + (eos_id,)
    h, tok, total = h0, first_token, 0.0
    for i, t in enumerate(seq):
      logp, h = step_fn(h, tok, i)
      total += float(logp[t])
      tok = t
    out[seq[:-1]] = total / ((5.0 + len(seq)) / 6.0) ** alpha
  return out
