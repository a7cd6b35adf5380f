"""The substring constraint over S suffix-array shards: the same searches (hypotheses, scores, counts, n-gram
history) as the one-shard constraint over the same documents, for several shard counts, both loop shapes and
with the shards placed over a mesh axis; shard building by documents."""

import functools

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from jax.sharding import NamedSharding, PartitionSpec as P

from genret_jax.decoding import SubstringConstraint, SuffixArrayIndex, beam_search
from genret_jax.decoding.fake_model import FakeModel, fake_tokens_to_logits
from genret_jax.decoding.sharded_substring import ShardedSubstringConstraint
from genret_jax.decoding.suffix_array import shard_bounds
from genret_jax.errors import InputError

V, SEP, EOS = 10, 0, 1


@functools.partial(jax.jit, static_argnames=("num_beams", "max_decode_len"))
def run(params, cache, first, constraint, *, num_beams, max_decode_len):
  return beam_search(functools.partial(fake_tokens_to_logits, params), cache, first, num_beams=num_beams,
                     max_decode_len=max_decode_len, eos_id=EOS, pad_id=SEP, constraint=constraint,
                     keep_history=True)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _corpus(seed, num_docs=24):
  # Mixed alphabets: documents over 3 tokens give large intervals (the top-M check, enumeration and
  # fallback run), the others small ones (sparse steps).
  rng = np.random.default_rng(seed)
  return [rng.integers(2, 5 if i % 3 == 0 else V, size=int(rng.integers(1, 30))) for i in range(num_docs)]


KW = {"top_m": 2, "small_interval": 4, "fallback_chunk": 2, "enum_window": 2, "enum_iters": 2}


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), shards=st.sampled_from([1, 2, 3, 5]), static=st.booleans(),
       pairs=st.booleans())
def test_sharded_search_equals_one_shard(seed, shards, static, pairs):
  docs = _corpus(seed)
  index = SuffixArrayIndex.build(docs, sep_id=SEP)
  kw = {**KW, "static_searches": static, **({} if pairs else {"pair_budget_bytes": 0})}
  one = SubstringConstraint.from_index(index, vocab_size=V, eos_id=EOS, **kw)
  many = ShardedSubstringConstraint.from_index(index, shards, vocab_size=V, eos_id=EOS, **kw)
  assert many.num_shards == shards
  model = FakeModel(V, seed=seed % 1000)
  cache, first = model.decode_init(np.random.default_rng(seed).integers(2, V, size=(3, 3)))
  want = run(model.params, cache, first, one, num_beams=4, max_decode_len=5)
  got = run(model.params, cache, first, many, num_beams=4, max_decode_len=5)
  assert np.asarray(want.valid).sum() > 0
  _assert_same(got, want)


@pytest.mark.parametrize("queries", [4, 3])
def test_shards_placed_over_a_mesh_axis_give_the_same_search(queries):
  """Four shards over a 4-way `model` axis of a (data 2, model 4) mesh: each device holds one shard's arrays
  and masks with them under `shard_map`, and the search returns what the unplaced constraint returns. With 4
  queries the rows split over `data` (2 whole queries per device); 3 queries do not split into whole queries,
  so every device takes all rows (splitting them would cut a query's beams apart)."""
  docs = _corpus(7, num_docs=40)
  index = SuffixArrayIndex.build(docs, sep_id=SEP)
  many = ShardedSubstringConstraint.from_index(index, 4, vocab_size=V, eos_id=EOS, **KW)
  model = FakeModel(V, seed=3)
  cache, first = model.decode_init(np.random.default_rng(3).integers(2, V, size=(queries, 3)))
  want = run(model.params, cache, first, many, num_beams=4, max_decode_len=5)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    placed = many.place(mesh)
    assert placed.shards.sa.sharding.spec == P("model") and placed.mesh_axis == "model"
    assert placed.shards.sa.addressable_shards[0].data.shape[0] == 1   # one shard's rows per device
    rows = (lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))) if queries % 2 == 0 else (lambda x: x)
    got = run(model.params, jax.tree.map(rows, cache), rows(first), placed, num_beams=4, max_decode_len=5)
  _assert_same(got, want)
  assert np.asarray(want.valid).sum() > 0


def test_an_axis_that_does_not_divide_the_shards_replicates():
  index = SuffixArrayIndex.build(_corpus(7, num_docs=40), sep_id=SEP)
  many = ShardedSubstringConstraint.from_index(index, 4, vocab_size=V, eos_id=EOS, **KW)
  replicated = many.place(jax.make_mesh((8,), ("model",)))
  assert replicated.shards.sa.sharding.spec == P() and replicated.mesh_axis is None and replicated.mesh is None


def test_shards_split_documents_without_loss():
  docs = _corpus(5, num_docs=11)
  shards = SuffixArrayIndex.build_shards(docs, SEP, 3)
  assert all(s.num_docs >= 1 for s in shards) and sum(s.num_docs for s in shards) == len(docs)
  flat = [s.doc_tokens(d) for s in shards for d in range(s.num_docs)]
  for a, b in zip(flat, docs):
    np.testing.assert_array_equal(a, b)
  whole = SuffixArrayIndex.build(docs, sep_id=SEP)
  for gram in ([2], [2, 3], [4, 2, 3], [9, 9]):
    assert sum(s.count(gram) for s in shards) == whole.count(gram)
  assert shard_bounds([10] * 10, 3) == [0, 4, 7, 10]
  assert shard_bounds([100, 1, 1, 1], 3) == [0, 1, 2, 4]      # every shard keeps a document
  with pytest.raises(InputError, match="at least one document"):
    SuffixArrayIndex.build_shards(docs[:2], SEP, 3)
  with pytest.raises(InputError, match="at least one shard"):
    ShardedSubstringConstraint.from_shards([], vocab_size=V, eos_id=EOS)


def test_a_corpus_past_one_int32_shard_goes_on_device_in_shards(monkeypatch):
  """With the int32 limit lowered to 60 positions: the host index of a ~250-token corpus gets an int64 suffix
  array with the same answers, the one-shard device constraint refuses it with a clear error, and 8 shards
  (each under the limit) search exactly like the one-shard constraint over an ordinary build."""
  from genret_jax.decoding import suffix_array
  docs = _corpus(11, num_docs=16)
  small = SuffixArrayIndex.build(docs, sep_id=SEP)
  one = SubstringConstraint.from_index(small, vocab_size=V, eos_id=EOS, **KW)
  monkeypatch.setattr(suffix_array, "MAX_INT32_TOKENS", 60)
  wide = SuffixArrayIndex.build(docs, sep_id=SEP)
  assert wide.num_tokens > 60 and wide.sa.dtype == np.int64 and small.sa.dtype == np.int32
  np.testing.assert_array_equal(wide.sa, small.sa)
  for gram in ([2], [3, 4], [2, 2, 2]):
    assert wide.count(gram) == small.count(gram)
    np.testing.assert_array_equal(np.sort(wide.occurrences(gram)), np.sort(small.occurrences(gram)))
  with pytest.raises(InputError, match="split it into shards"):
    SubstringConstraint.from_index(wide, vocab_size=V, eos_id=EOS)
  many = ShardedSubstringConstraint.from_index(wide, 8, vocab_size=V, eos_id=EOS, **KW)
  model = FakeModel(V, seed=2)
  cache, first = model.decode_init(np.random.default_rng(2).integers(2, V, size=(3, 3)))
  _assert_same(run(model.params, cache, first, many, num_beams=4, max_decode_len=5),
               run(model.params, cache, first, one, num_beams=4, max_decode_len=5))
