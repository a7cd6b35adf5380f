"""Beam search against a straightforward host reference, on a small deterministic fake model.

Shapes are fixed across examples (vocab, batch, beams, padded trie sizes) so each configuration
compiles once."""

import functools
import importlib

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from jax.sharding import NamedSharding, PartitionSpec as P

from genret_jax.decoding import TrieConstraint, beam_search, hypotheses
from genret_jax.decoding import constraints as constraints_mod
from genret_jax.decoding.fake_model import FakeModel, fake_tokens_to_logits
from genret_jax.decoding.reference import exhaustive_scores, reference_beam_search, trie_allowed_fn
from genret_jax.errors import InputError

V, EOS, PAD = 10, 1, 0
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)


@functools.partial(jax.jit, static_argnames=("num_beams", "max_decode_len", "alpha", "num_return"))
def run(params, cache, first, constraint=None, query_mask=None, *, num_beams, max_decode_len,
        alpha=0.0, num_return=None):
  return beam_search(functools.partial(fake_tokens_to_logits, params), cache, first,
                     num_beams=num_beams, max_decode_len=max_decode_len, eos_id=EOS, pad_id=PAD,
                     alpha=alpha, constraint=constraint, num_return=num_return, query_mask=query_mask)


def make_trie(ids):
  return TrieConstraint.build(ids, vocab_size=V, eos_id=EOS, dense_levels=1, max_branch=16, capacity=64)


def check_against_reference(model, out, inputs, *, num_beams, max_len, allowed_fn, truncated, alpha=0.0,
                            num_return=None):
  h0 = model.np_init(inputs)
  got = hypotheses(out)
  ended = np.asarray(out.ended_by_eos)
  for q in range(inputs.shape[0]):
    want, _ = reference_beam_search(model.np_step, int(h0[q]), 0, num_beams=num_beams,
                                    max_decode_len=max_len, eos_id=EOS, allowed_fn=allowed_fn,
                                    vocab_size=V, truncated_is_valid=truncated, alpha=alpha,
                                    num_return=num_return)
    assert [w[0] for w in want] == [g[0] for g in got[q]], (q, want, got[q])
    np.testing.assert_allclose([g[1] for g in got[q]], [w[1] for w in want], rtol=1e-4, atol=1e-4)
    assert list(ended[q, :len(want)]) == [w[2] for w in want]
    scores = [g[1] for g in got[q]]
    assert scores == sorted(scores, reverse=True)
    assert len(set(g[0] for g in got[q])) == len(got[q])


@SETTINGS
@given(seed=st.integers(0, 10**6), alpha=st.sampled_from([0.0, 0.6]))
def test_unconstrained_matches_reference(seed, alpha):
  model = FakeModel(V, seed=seed)
  inputs = np.random.default_rng(seed).integers(2, V, size=(2, 3))
  cache, first = model.decode_init(inputs)
  out = run(model.params, cache, first, num_beams=3, max_decode_len=4, alpha=alpha)
  check_against_reference(model, out, inputs, num_beams=3, max_len=4, allowed_fn=None, truncated=True,
                          alpha=alpha)


ident = st.lists(st.integers(2, V - 1), min_size=1, max_size=5)


@SETTINGS
@given(ids=st.lists(ident, min_size=1, max_size=12), seed=st.integers(0, 10**6), sparse=st.booleans())
def test_trie_matches_masked_reference(ids, seed, sparse):
  """`sparse`: the CSR levels take the sparse steps (`sparse_allowed`), forced on this 10-token vocabulary."""
  model = FakeModel(V, seed=seed)
  inputs = np.random.default_rng(seed).integers(2, V, size=(2, 3))
  cache, first = model.decode_init(inputs)
  trie = make_trie(ids).replace(sparse_steps=sparse)
  out = run(model.params, cache, first, trie, num_beams=3, max_decode_len=4)
  check_against_reference(model, out, inputs, num_beams=3, max_len=4,
                          allowed_fn=trie_allowed_fn(ids, EOS), truncated=False)
  # Every result is a complete identifier that fits max_decode_len with its EOS.
  fits = {tuple(i) for i in ids if len(i) + 1 <= 4}
  for q in hypotheses(out):
    assert all(h in fits for h, _ in q)
  assert np.all(np.asarray(out.ended_by_eos) == np.asarray(out.valid))


@SETTINGS
@given(ids=st.lists(st.lists(st.integers(2, V - 1), min_size=1, max_size=3), min_size=1, max_size=6,
                    unique_by=tuple), seed=st.integers(0, 10**6), alpha=st.sampled_from([0.0, 0.6]))
def test_trie_beam_at_least_identifiers_is_exhaustive(ids, seed, alpha):
  model = FakeModel(V, seed=seed)
  inputs = np.random.default_rng(seed).integers(2, V, size=(2, 3))
  cache, first = model.decode_init(inputs)
  out = run(model.params, cache, first, make_trie(ids), num_beams=6, max_decode_len=4, alpha=alpha)
  h0 = model.np_init(inputs)
  for q, got in enumerate(hypotheses(out)):
    scores = exhaustive_scores(model.np_step, int(h0[q]), 0, ids, eos_id=EOS, alpha=alpha)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    assert got[0][0] == ranked[0][0]
    assert [g[0] for g in got] == [r[0] for r in ranked]     # every identifier, in exhaustive order
    np.testing.assert_allclose([g[1] for g in got], [r[1] for r in ranked], rtol=1e-4, atol=1e-4)


def _model_and_inputs(seed=0, batch=2):
  model = FakeModel(V, seed=seed)
  inputs = np.random.default_rng(seed).integers(2, V, size=(batch, 3))
  cache, first = model.decode_init(inputs)
  return model, inputs, cache, first


def test_identifiers_longer_than_max_len_are_never_returned():
  model, _, cache, first = _model_and_inputs()
  out = run(model.params, cache, first, make_trie([[2, 3, 4, 5, 6], [7, 8, 9, 2, 3, 4]]),
            num_beams=3, max_decode_len=4)
  assert not np.asarray(out.valid).any()
  out = run(model.params, cache, first, make_trie([[2, 3, 4, 5, 6], [7, 8]]), num_beams=3,
            max_decode_len=4)
  assert [[h for h, _ in q] for q in hypotheses(out)] == [[(7, 8)], [(7, 8)]]
  valid = np.asarray(out.valid)
  assert valid[:, 0].all() and not valid[:, 1:].any()      # fewer than k: padded with valid=False
  assert (np.asarray(out.tokens)[:, 1:] == PAD).all()


def test_empty_trie_returns_nothing():
  model, _, cache, first = _model_and_inputs()
  out = run(model.params, cache, first, make_trie([]), num_beams=3, max_decode_len=4)
  assert not np.asarray(out.valid).any()
  assert int(out.num_steps) == 1                          # every beam dies at the first step


def test_trie_rejects_bad_identifiers():
  with pytest.raises(InputError, match="EOS"):
    make_trie([[2, EOS, 3]])
  with pytest.raises(InputError, match="outside"):
    make_trie([[2, V]])


def test_query_mask_rows_decode_nothing_and_leave_others_unchanged():
  model, _, cache, first = _model_and_inputs(seed=3, batch=3)
  trie = make_trie([[2, 3], [2, 4, 5], [6], [7, 8, 9]])
  full = run(model.params, cache, first, trie, num_beams=3, max_decode_len=4)
  mask = np.array([True, False, True])
  part = run(model.params, cache, first, trie, mask, num_beams=3, max_decode_len=4)
  assert not np.asarray(part.valid)[1].any()
  for name in ("tokens", "scores", "valid", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(part, name))[mask],
                                  np.asarray(getattr(full, name))[mask])


def test_early_stop_does_not_change_results():
  model, inputs, cache, first = _model_and_inputs(seed=5)
  out = run(model.params, cache, first, num_beams=2, max_decode_len=12, num_return=1)
  assert int(out.num_steps) <= 12
  check_against_reference(model, out, inputs, num_beams=2, max_len=12, allowed_fn=None, truncated=True,
                          num_return=1)


def test_sharded_batch_equals_unsharded():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model, _, cache, first = _model_and_inputs(seed=11, batch=16)
  trie = make_trie([[2, 3], [2, 4, 5], [6], [7, 8, 9], [3, 3, 3]])
  ref = run(model.params, cache, first, trie, num_beams=3, max_decode_len=4)
  with jax.set_mesh(mesh):
    shard = NamedSharding(mesh, P("data"))
    cache_s = jax.device_put(cache, shard)
    first_s = jax.device_put(first, shard)
    trie_s = jax.device_put(trie, NamedSharding(mesh, P()))
    params_s = jax.device_put(model.params, NamedSharding(mesh, P()))
    out = run(params_s, cache_s, first_s, trie_s, num_beams=3, max_decode_len=4)
    assert out.tokens.sharding.spec[0] == "data"
  for name in ("tokens", "scores", "valid", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)))


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_per_query_and_in_place_cache_equal_cache_repeated_and_reordered(family):
  """T5 keeps the projected encoder keys/values and LLaMA its prefilled prompt once per query
  (`cache["per_query"]`), and both keep the self-attention keys/values where each beam wrote them
  (`cache["in_place"]`, read through `cache_rows`); the search must equal the one with every leaf repeated per
  beam and reordered with the beams."""
  import flax.traverse_util as tu
  import jax.numpy as jnp
  from genret_jax.models.llama import LlamaConfig
  from genret_jax.models.model_api import DecoderOnlyModel, EncoderDecoderModel
  from genret_jax.models.t5 import T5Config

  if family == "t5":
    model = EncoderDecoderModel(T5Config(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                                         num_encoder_layers=1, num_decoder_layers=2, dtype="float32",
                                         param_dtype="float32"))
    params = model.init(jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 6), "decoder_input_tokens": (1, 4)})
  else:   # grouped-query heads: the fold must keep each query head on its kv head
    model = DecoderOnlyModel(LlamaConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                                         head_dim=8, d_ff=32, dtype="float32"))
    params = model.init(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 10)})
  inputs = np.array(jax.random.randint(jax.random.PRNGKey(1), (3, 6), 2, 40), np.int32)
  inputs[:, 4:] = 0   # padding (T5's cross-attention mask, LLaMA's left-padded prompt) must hide in both layouts
  inputs[1, 2:] = 0
  inputs[:, 3] = EOS

  @functools.partial(jax.jit, static_argnames=("shared",))
  def search(params, inputs, shared):
    cache, first = model.decode_init(params, inputs, 5)
    assert cache["per_query"] and all(x.shape[0] == 3 for x in jax.tree.leaves(cache["per_query"]))
    assert cache["in_place"]
    if not shared:
      merged = {**tu.flatten_dict(cache["cache"]), **tu.flatten_dict(cache["in_place"]),
                **tu.flatten_dict(cache["per_query"])}
      cache = {"cache": tu.unflatten_dict(merged), "position": cache["position"]}
    return beam_search(functools.partial(model.tokens_to_logits, params), cache, first, num_beams=4,
                       max_decode_len=5, eos_id=EOS, pad_id=PAD)

  shared, repeated = search(params, inputs, True), search(params, inputs, False)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
  np.testing.assert_allclose(np.asarray(shared.scores), np.asarray(repeated.scores), rtol=1e-5, atol=1e-5)
  assert bool(jnp.all(shared.valid))


# --- candidate pre-selection ---------------------------------------------------------------------------

@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), k=st.sampled_from([1, 4, 8]), v=st.sampled_from([128, 512, 1024]),
       block=st.sampled_from([2, 16, 128]), masked=st.floats(0.0, 0.999))
def test_candidate_top_k_equals_one_top_k(seed, k, v, block, masked):
  """Block pre-selection returns the top-k of the K x V sums: same scores; same positions for every valid
  (not NEG_INF-masked) candidate; dead beams and mostly masked rows included."""
  bs_mod = importlib.import_module("genret_jax.decoding.beam_search")   # the package re-exports the function
  from genret_jax.decoding.constraints import NEG_INF, top_k
  rng = np.random.default_rng(seed)
  b, c = 3, 2 * k
  lp = jax.nn.log_softmax(rng.standard_normal((b, k, v)).astype(np.float32) * 3, axis=-1)
  lp = np.where(rng.random((b, k, v)) < masked, NEG_INF, np.asarray(lp))
  scores = rng.uniform(-6, 0, (b, k)).astype(np.float32)
  scores[0, k // 2:] = NEG_INF                      # dead beams
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(constraints_mod, "TOPK_BLOCK", block)
    got_s, got_i = bs_mod.candidate_top_k(jax.numpy.asarray(scores), jax.numpy.asarray(lp), c)
  want_s, want_i = top_k(jax.numpy.asarray((scores[:, :, None] + lp).reshape(b, k * v)), c)
  np.testing.assert_array_equal(np.asarray(got_s), np.asarray(want_s))
  ok = np.asarray(want_s) > NEG_INF / 2
  np.testing.assert_array_equal(np.asarray(got_i)[ok], np.asarray(want_i)[ok])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), rows=st.sampled_from([1, 5]), v=st.sampled_from([512, 2048]),
       c=st.sampled_from([1, 8, 65]), block=st.sampled_from([16, 128]), ties=st.booleans())
def test_block_top_k_of_plain_rows_equals_top_k(seed, rows, v, c, block, ties):
  """Without segment offsets (the n-gram top-M check's per-row use) the pre-selected top-k equals one
  top-k: same values, and same positions wherever the values are not tied."""
  from genret_jax.decoding.constraints import block_top_k, top_k
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, v)).astype(np.float32)
  if ties:   # coarse values: many exact ties, positions may differ among them but values may not
    x = np.round(x * 2) / 2
  got_v, got_i = block_top_k(jax.numpy.asarray(x), c, block=block)
  want_v, want_i = top_k(jax.numpy.asarray(x), c)
  np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
  np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(got_i), axis=1), np.asarray(got_v))
  if not ties:
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), k=st.sampled_from([1, 3, 8]), v=st.sampled_from([16, 512]),
       width=st.sampled_from([1, 4, 9]))
def test_sparse_candidate_top_k_equals_masked_top_k(seed, k, v, width):
  """Reading the log-probs at listed allowed tokens gives the top-k of the masked K x V sums: same scores,
  same positions for every valid candidate; dead beams, empty rows and fewer slots than candidates
  (k * width < 2k) included."""
  bs_mod = importlib.import_module("genret_jax.decoding.beam_search")
  from genret_jax.decoding.constraints import NEG_INF, top_k
  rng = np.random.default_rng(seed)
  b, c = 3, 2 * k
  logits = jax.numpy.asarray(rng.standard_normal((b * k, v)).astype(np.float32) * 3)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  allowed = np.full((b * k, width), v, np.int32)
  for row in range(b * k):
    m = int(rng.integers(0, width + 1))            # 0: a row with no allowed token
    allowed[row, :m] = np.sort(rng.choice(v, size=min(m, v), replace=False))
  scores = rng.uniform(-6, 0, (b, k)).astype(np.float32)
  scores[0, k // 2:] = NEG_INF                       # dead beams
  mask = np.zeros((b * k, v + 1), bool)
  mask[np.arange(b * k)[:, None], allowed] = True
  masked = np.where(mask[:, :v], np.asarray(logits - lse), NEG_INF)
  got_s, got_i = bs_mod.sparse_candidate_top_k(jax.numpy.asarray(scores), logits, lse,
                                               jax.numpy.asarray(allowed), c)
  want_s, want_i = top_k(jax.numpy.asarray((scores[:, :, None] + masked.reshape(b, k, v)).reshape(b, k * v)), c)
  ok = np.asarray(want_s) > NEG_INF / 2
  np.testing.assert_array_equal(np.asarray(got_s)[ok], np.asarray(want_s)[ok])
  assert np.all(np.asarray(got_s)[~ok] <= NEG_INF / 2)
  np.testing.assert_array_equal(np.asarray(got_i)[ok], np.asarray(want_i)[ok])


def test_block_preselection_leaves_search_results_unchanged(monkeypatch):
  """The same searches (unconstrained and trie, vocab 1,024 so the block path runs) with the pre-selection
  on and off return identical outputs; so do the trie's sparse steps on and off."""
  v = 1024
  model = FakeModel(v, seed=5)
  inputs = np.random.default_rng(5).integers(2, v, size=(3, 3))
  cache, first = model.decode_init(inputs)
  ids = np.random.default_rng(6).integers(2, v, size=(200, 4))
  trie = TrieConstraint.build(ids, vocab_size=v, eos_id=EOS, dense_levels=1, max_branch=64)
  outs = {}
  for block in (128, 0):
    monkeypatch.setattr(constraints_mod, "TOPK_BLOCK", block)
    for name, constraint in (("free", None), ("trie", trie), ("trie_dense_steps", trie.replace(sparse_steps=False))):
      fn = jax.jit(lambda p, c_, f, con: beam_search(functools.partial(fake_tokens_to_logits, p), c_, f,
                                                     num_beams=8, max_decode_len=5, eos_id=EOS, pad_id=PAD,
                                                     constraint=con))
      outs[block, name] = fn(model.params, cache, first, constraint)
  for name in ("free", "trie", "trie_dense_steps"):
    assert np.asarray(outs[128, name].valid).sum() > 0
    for x, y in zip(jax.tree.leaves(outs[128, name]), jax.tree.leaves(outs[0, name])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The CSR levels of this trie (max_branch 64, V 1,024) take the sparse steps by default; same results.
  for x, y in zip(jax.tree.leaves(outs[128, "trie"]), jax.tree.leaves(outs[128, "trie_dense_steps"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
