"""Suffix-array index and substring (n-gram) constraint: brute-force counts, exact masking, beam search
equal to a reference that masks with the true allowed set, history, and edge cases."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from genret_jax.decoding import (NEG_INF, SubstringConstraint, SubstringState, SuffixArrayIndex,
                                 beam_search, hypotheses, ngram_history)
from genret_jax.decoding.fake_model import FakeModel, fake_tokens_to_logits
from genret_jax.decoding.reference import ngram_count, reference_beam_search, substring_allowed_fn
from genret_jax.errors import InputError

V, SEP, EOS = 10, 0, 1
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
docs_st = st.lists(st.lists(st.integers(2, V - 1), min_size=0, max_size=8), min_size=0, max_size=5)


def build(docs, **kw):
  index = SuffixArrayIndex.build([np.asarray(d, np.int64) for d in docs], sep_id=SEP)
  kw = {"top_m": 2, "small_interval": 2, "fallback_chunk": 2, **kw}
  return index, SubstringConstraint.from_index(index, vocab_size=V, eos_id=EOS, capacity=64, **kw)


@functools.partial(jax.jit, static_argnames=("num_beams", "max_decode_len", "keep_history"))
def run(params, cache, first, constraint, *, num_beams, max_decode_len, keep_history=False):
  return beam_search(functools.partial(fake_tokens_to_logits, params), cache, first,
                     num_beams=num_beams, max_decode_len=max_decode_len, eos_id=EOS, pad_id=SEP,
                     constraint=constraint, keep_history=keep_history)


# --- host index ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, derandomize=True)
@given(docs=docs_st, ngram=st.lists(st.integers(0, V - 1), min_size=1, max_size=3))
def test_index_queries_equal_brute_force(docs, ngram):
  index, _ = build(docs)
  assert index.count(ngram) == ngram_count(docs, ngram)
  lo, hi = index.range(ngram)
  assert hi - lo == index.count(ngram)
  pos = index.occurrences(ngram)
  docs_of = index.doc_of(pos)
  for p, d in zip(pos, docs_of):
    start = p - index.doc_starts[d]
    assert list(docs[d][start:start + len(ngram)]) == list(ngram)
  assert len(index.occurrences(ngram, limit=1)) == min(1, len(pos))
  for i, d in enumerate(docs):
    assert list(index.doc_tokens(i)) == list(d)
  assert index.num_tokens == sum(len(d) + 1 for d in docs)
  assert index.nbytes == index.tokens.nbytes + index.sa.nbytes + index.doc_starts.nbytes


def test_index_save_load_roundtrip_and_errors(tmp_path):
  index, _ = build([[2, 3, 4], [4, 3, 2, 3]])
  index.save(str(tmp_path / "sa"))
  loaded = SuffixArrayIndex.load(str(tmp_path / "sa"))
  assert loaded.count([2, 3]) == 2 and loaded.num_docs == 2 and loaded.tokens.dtype == np.uint16
  assert loaded.bytes_per_token == pytest.approx(index.bytes_per_token)
  with pytest.raises(InputError, match="missing"):
    SuffixArrayIndex.load(str(tmp_path))
  with pytest.raises(InputError, match="separator"):
    SuffixArrayIndex.build([np.array([2, SEP, 3])], sep_id=SEP)


# --- exact masking ------------------------------------------------------------------------------

# Paths of the exact check: default (bigram table + enumeration), no bigram table with a one-round
# enumeration of one-token windows (most large rows fall back to the V-wide check), no enumeration.
CONFIGS = {"default": {}, "no_pairs_short_enum": {"pair_budget_bytes": 0, "enum_window": 1, "enum_iters": 1},
           "no_enum": {"enum_iters": 0},
           # The accelerator loop shapes (static unrolled searches, one chunk), forced on CPU.
           "static": {"static_searches": True, "enum_window": 1, "enum_iters": 1},
           "static_no_pairs": {"static_searches": True, "pair_budget_bytes": 0},
           # Every interval below the root is small and there is no bigram table: after step 0 every step
           # takes the sparse path (`sparse_allowed`).
           "sparse_from_depth_1": {"pair_budget_bytes": 0, "small_interval": 64}}


def _random_states(index, docs, rng, n):
  grams = [()] + [tuple(d[j:j + m]) for d in docs for m in (1, 2, 3) for j in range(len(d) - m + 1)]
  states = []
  for _ in range(n):
    g = grams[rng.integers(len(grams))]
    lo, hi = index.range(g)
    states.append((lo, hi, len(g)))
  return states, SubstringState(*(jnp.asarray([s[i] for s in states], jnp.int32) for i in range(3)))


@SETTINGS
@given(docs=docs_st, seed=st.integers(0, 10**6), config=st.sampled_from(sorted(CONFIGS)))
def test_bounded_check_selects_like_the_full_mask(docs, seed, config):
  """The bounded check + fallback must give the same top candidates as the full-vocabulary mask."""
  index, sc = build(docs, **CONFIGS[config])
  rng = np.random.default_rng(seed)
  k, c, n = 3, 6, 6
  # States: random corpus n-grams (valid intervals) and the empty n-gram.
  states, state = _random_states(index, docs, rng, n)
  logp = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((n, V)) * 3, jnp.float32))
  beam_scores = jnp.asarray(rng.uniform(-5, 0, n), jnp.float32)
  masked = np.asarray(_mask(sc, state, logp, beam_scores, k, c))
  full = np.asarray(sc._full_mask(state, logp))
  for q in range(n // k):
    rows = slice(q * k, (q + 1) * k)
    a = (np.asarray(beam_scores)[rows, None] + masked[rows]).ravel()
    b = (np.asarray(beam_scores)[rows, None] + full[rows]).ravel()
    top_a, top_b = np.argsort(-a, kind="stable")[:c], np.argsort(-b, kind="stable")[:c]
    valid = b[top_b] > NEG_INF / 2
    np.testing.assert_array_equal(top_a[valid], top_b[valid])
  # The full mask itself is the true allowed set.
  allowed = substring_allowed_fn(docs, vocab_size=V, sep_id=SEP, eos_id=EOS)
  for row, g in enumerate(states):
    gram = tuple(index.tokens[index.sa[g[0]]:index.sa[g[0]] + g[2]]) if g[1] > g[0] else ()
    if g[2] == 0 or g[1] > g[0]:
      assert set(np.nonzero(full[row] > NEG_INF / 2)[0]) == allowed(gram)


@pytest.mark.parametrize("static", [False, True])
def test_top_m_check_preselection_leaves_ngram_search_unchanged(static):
  """The top-M check's per-row top-k pre-selected by blocks (vocabulary 2,048, top_m 7: the block path runs)
  and as one top-k give identical searches; a small alphabet keeps intervals large, so the check runs."""
  v = 2048
  rng = np.random.default_rng(3)
  docs = [rng.integers(2, 24, size=int(rng.integers(20, 60))) for _ in range(12)]
  index = SuffixArrayIndex.build([np.asarray(d, np.int64) for d in docs], sep_id=SEP)
  model = FakeModel(v, seed=4)
  cache, first = model.decode_init(rng.integers(2, v, size=(3, 3)))
  outs = []
  for block in (128, 0):
    sc = SubstringConstraint.from_index(index, vocab_size=v, eos_id=EOS, top_m=7, small_interval=2,
                                        pair_budget_bytes=0, static_searches=static, topk_block=block)
    outs.append(run(model.params, cache, first, sc, num_beams=6, max_decode_len=4, keep_history=True))
  assert np.asarray(outs[0].valid).sum() > 0
  for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.partial(jax.jit, static_argnames=("k", "c"))
def _mask(sc, state, logp, beam_scores, k, c):
  return sc.mask_log_probs(state, logp, beam_scores, num_beams=k, num_candidates=c)


@SETTINGS
@given(docs=docs_st, seed=st.integers(0, 10**6))
def test_precomputed_tables_and_enumeration_are_exact(docs, seed):
  """Depth-0 mask, depth-1 bigram rows and interval table, and every row the jump enumeration marks
  done hold exactly the true allowed set."""
  index, sc = build(docs, enum_window=2, enum_iters=2, enum_chunk=4)
  allowed = substring_allowed_fn(docs, vocab_size=V, sep_id=SEP, eos_id=EOS, allow_eos=False)
  for t in range(V):
    assert t in (SEP, EOS) or (int(sc.unigram_lo[t]), int(sc.unigram_lo[t + 1])) == index.range([t])
  assert set(np.nonzero(np.asarray(sc.root_allowed))[0]) == allowed(())
  rng = np.random.default_rng(seed)
  states, state = _random_states(index, docs, rng, 8)
  logp = jnp.asarray(rng.standard_normal((8, V)), jnp.float32)
  dense = np.asarray(sc._dense_allowed(state, V))
  masked, done = _enumerate(sc, state, logp, jnp.ones((8,), bool))
  masked, done = np.asarray(masked), np.asarray(done)
  for row, (lo, hi, depth) in enumerate(states):
    gram = tuple(int(x) for x in index.tokens[index.sa[lo]:index.sa[lo] + depth]) if hi > lo else ()
    want = allowed(gram)
    if depth <= 1:
      assert set(np.nonzero(dense[row])[0]) == want
    # A row whose cursor reached its interval's end has its whole allowed set; others may not.
    got = set(np.nonzero(masked[row] > NEG_INF / 2)[0])
    assert got <= want
    if done[row]:
      assert got == want
    if len(want) <= 2:     # one round of a 2-token window reads at least min(2, #continuations) blocks
      assert done[row]


@SETTINGS
@given(docs=docs_st, seed=st.integers(0, 10**6), pairs=st.booleans())
def test_sparse_allowed_lists_the_true_set(docs, seed, pairs):
  """`sparse_allowed` is usable exactly when no live row is at a table depth or has a large interval, and
  then lists each live row's true allowed set (EOS included), without repeats."""
  index, sc = build(docs, small_interval=4, **({} if pairs else {"pair_budget_bytes": 0}))
  allowed = substring_allowed_fn(docs, vocab_size=V, sep_id=SEP, eos_id=EOS)
  rng = np.random.default_rng(seed)
  states, state = _random_states(index, docs, rng, 8)
  live = rng.random(8) < 0.7
  beam_scores = jnp.asarray(np.where(live, -1.0, NEG_INF), jnp.float32)
  tokens, usable = jax.jit(type(sc).sparse_allowed)(sc, state, beam_scores)
  tokens = np.asarray(tokens)
  sizes = [hi - lo for lo, hi, _ in states]
  table = [depth == 0 or (depth == 1 and sc.has_pairs) for _, _, depth in states]
  assert bool(usable) == all(not lv or (not t and s <= 4) for lv, t, s in zip(live, table, sizes))
  for row, (lo, hi, depth) in enumerate(states):
    if live[row] and not table[row] and sizes[row] <= 4:
      gram = tuple(int(x) for x in index.tokens[index.sa[lo]:index.sa[lo] + depth])
      listed = [int(t) for t in tokens[row] if t < V]
      assert len(listed) == len(set(listed)) and set(listed) == allowed(gram)
  assert not bool(jax.jit(type(sc).sparse_allowed)(sc.replace(sparse_steps=False), state,
                                                    jnp.full((8,), -1.0))[1])


@pytest.mark.parametrize("pairs", [True, False])
def test_sparse_steps_leave_search_unchanged(pairs):
  """Searches with the sparse steps on and off (`sparse_steps`) return identical outputs, history
  included, on a corpus with small and large intervals (with this seed: steps 0-2 dense, 3-5 sparse)."""
  rng = np.random.default_rng(11)
  docs = [list(rng.integers(2, 5 if i % 2 else V, size=int(rng.integers(5, 40)))) for i in range(30)]
  _, sc = build(docs, small_interval=16, **({} if pairs else {"pair_budget_bytes": 0}))
  model, _, cache, first = _query(4, batch=4)
  a = run(model.params, cache, first, sc, num_beams=4, max_decode_len=6, keep_history=True)
  b = run(model.params, cache, first, sc.replace(sparse_steps=False), num_beams=4, max_decode_len=6,
          keep_history=True)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.asarray(a.valid).sum() > 0


@jax.jit
def _enumerate(sc, state, logp, need):
  return sc.apply_enumeration(state, logp, jnp.full_like(logp, NEG_INF), need)


# --- constrained beam search ---------------------------------------------------------------------

def _query(seed, batch=2):
  model = FakeModel(V, seed=seed)
  inputs = np.random.default_rng(seed).integers(2, V, size=(batch, 3))
  cache, first = model.decode_init(inputs)
  return model, model.np_init(inputs), cache, first


@SETTINGS
@given(docs=docs_st, seed=st.integers(0, 10**6), config=st.sampled_from(["default", "no_pairs_short_enum", "static",
                                                                        "sparse_from_depth_1"]))
def test_substring_search_equals_true_mask_reference(docs, seed, config):
  index, sc = build(docs, **CONFIGS[config])
  model, h0, cache, first = _query(seed)
  out = run(model.params, cache, first, sc, num_beams=3, max_decode_len=4, keep_history=True)
  allowed = substring_allowed_fn(docs, vocab_size=V, sep_id=SEP, eos_id=EOS)
  got, hist = hypotheses(out), ngram_history(out)
  counts = np.asarray(out.counts)
  for q in range(2):
    want, want_hist = reference_beam_search(
        model.np_step, int(h0[q]), 0, num_beams=3, max_decode_len=4, eos_id=EOS, allowed_fn=allowed,
        vocab_size=V, truncated_is_valid=True, count_fn=lambda g: ngram_count(docs, g))
    assert [g[0] for g in got[q]] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got[q]], [w[1] for w in want], rtol=1e-4, atol=1e-4)
    assert len(set(g[0] for g in got[q])) == len(got[q])
    for j, (gram, _) in enumerate(got[q]):
      # A contiguous token sequence inside one document, with its corpus count.
      assert len(gram) >= 1 and any(
          tuple(d[i:i + len(gram)]) == gram for d in docs for i in range(len(d) - len(gram) + 1))
      assert counts[q, j] == ngram_count(docs, gram) == index.count(gram)
    assert set(hist[q]) == set(want_hist)
    for gram, (lp, cnt) in hist[q].items():
      assert cnt == want_hist[gram][1]
      np.testing.assert_allclose(lp, want_hist[gram][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pairs", [True, False])
def test_static_loop_shapes_equal_traced_ones(pairs):
  """The accelerator loop shapes (static unrolled searches of `search_rounds`, one chunk, no loops on
  steps without large intervals) return exactly what the CPU shapes return, on a corpus whose intervals
  take every path (top-M check, enumeration, fallback)."""
  rng = np.random.default_rng(7)
  docs = [list(rng.integers(2, 5 if i % 2 else V, size=int(rng.integers(5, 40)))) for i in range(30)]
  kw = {"enum_window": 2, "enum_iters": 2} if pairs else {"pair_budget_bytes": 0}
  index, traced = build(docs, static_searches=False, **kw)
  _, static = build(docs, static_searches=True, **kw)
  counts = np.bincount(index.tokens.astype(np.int64), minlength=V)[2:V]
  assert static.static_searches and not traced.static_searches
  assert static.search_rounds == int(counts.max()).bit_length()
  assert (static.enum_chunk, traced.enum_chunk) == (1024, 64)
  model, _, cache, first = _query(3, batch=4)
  a = run(model.params, cache, first, traced, num_beams=4, max_decode_len=6, keep_history=True)
  b = run(model.params, cache, first, static, num_beams=4, max_decode_len=6, keep_history=True)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.asarray(a.valid).sum() > 0


@SETTINGS
@given(doc=st.lists(st.integers(2, V - 1), min_size=1, max_size=3), seed=st.integers(0, 10**6))
def test_substring_beam_at_least_identifiers_is_exhaustive(doc, seed):
  """Beam 8 >= every valid n-gram of a <=3-token document: top-1 is the exhaustive best."""
  _, sc = build([doc])
  model, h0, cache, first = _query(seed)
  out = run(model.params, cache, first, sc, num_beams=8, max_decode_len=3)
  grams = {tuple(doc[i:j]) for i in range(len(doc)) for j in range(i + 1, len(doc) + 1)}
  for q, got in enumerate(hypotheses(out)):
    scores = {}
    for g in grams:       # each n-gram ends with EOS, or is cut at max length 3
      h, tok, total = int(h0[q]), 0, 0.0
      for i, t in enumerate(g + ((EOS,) if len(g) < 3 else ())):
        logp, h = model.np_step(h, tok, i)
        total, tok = total + float(logp[t]), t
      scores[g] = total
    best = max(scores, key=scores.get)
    assert got[0][0] == best
    assert sorted(g for g, _ in got) == sorted(grams)


def test_empty_corpus_and_empty_documents_return_nothing():
  model, _, cache, first = _query(0)
  for docs in ([], [[], []]):
    _, sc = build(docs)
    out = run(model.params, cache, first, sc, num_beams=3, max_decode_len=4, keep_history=True)
    assert not np.asarray(out.valid).any() and not np.asarray(out.history.valid).any()
    assert int(out.num_steps) == 1


def test_dead_end_without_eos_ends_the_beam():
  """With EOS banned, an n-gram that cannot be extended to max length dies instead of escaping."""
  model, _, cache, first = _query(1)
  _, sc = build([[5, 6, 7, 8], [7]], allow_eos=False)
  out = run(model.params, cache, first, sc, num_beams=3, max_decode_len=4, keep_history=True)
  for q in hypotheses(out):
    assert [g for g, _ in q] == [(5, 6, 7, 8)]
  _, sc = build([[5, 6], [7]], allow_eos=False)
  out = run(model.params, cache, first, sc, num_beams=3, max_decode_len=4, keep_history=True)
  assert not np.asarray(out.valid).any()


def test_build_index_cli(tmp_path):
  from genret_jax import cli
  toks = tmp_path / "docs.txt"
  toks.write_text("5 6 7\n8 9\n\n5 6\n")
  assert cli.main(["build-index", f"--tokens_file={toks}", f"--output_dir={tmp_path / 'sa'}",
                   "--sep_id=0"]) == 0
  index = SuffixArrayIndex.load(str(tmp_path / "sa"))
  assert index.num_docs == 4 and index.count([5, 6]) == 2
  assert cli.main(["build-index", "--kind=trie", f"--tokens_file={toks}",
                   f"--output_dir={tmp_path / 'trie'}", "--vocab_size=12"]) == 0
  from genret_jax.decoding import TrieConstraint
  assert int(TrieConstraint.load(str(tmp_path / "trie")).num_identifiers) == 3
  import json
  report = json.loads((tmp_path / "sa" / "report.json").read_text())
  assert (report["empty_lines"], report["skipped_empty"]) == (1, 0)   # an empty document, kept and counted
  (tmp_path / "bad.txt").write_text("5 6\n7 x\n")
  assert cli.main(["build-index", f"--tokens_file={tmp_path / 'bad.txt'}",
                   f"--output_dir={tmp_path / 'bad'}"]) == 2
  # Ids past the vocabulary (both kinds; the suffix array took them) and a file with no ids (an empty index
  # was written): file:line errors.
  from genret_jax.decoding.build_index import read_token_file
  from genret_jax.errors import InputError
  with pytest.raises(InputError, match=r"docs.txt:2: token id 9 >= vocab_size 9"):
    read_token_file(str(toks), vocab_size=9)
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(InputError, match="no token ids"):
    read_token_file(str(tmp_path / "empty.txt"))
