"""CGL model side: batched scoring (padding, encode-once, sharding), CGL on Cranfield (chance level, shared
negatives, a trained model beats its init), and the `genret cgl` command end to end.

Every scorer here uses batch 8 and one length bucket (32) so the few jitted functions compile once per shape.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

sys.path.insert(0, os.path.dirname(__file__))
import toy_tasks  # noqa: E402

from genret_jax import corpora, identifiers  # noqa: E402
from genret_jax.errors import InputError  # noqa: E402
from genret_jax.models import model_api, params_io, partitioning  # noqa: E402
from genret_jax.models.llama import LlamaConfig  # noqa: E402
from genret_jax.models.t5 import T5Config  # noqa: E402
from genret_jax.scaling import cgl, cgl_eval, scoring  # noqa: E402

VOCAB = 1024
BUCKETS = (32,)


def t5():
  return model_api.EncoderDecoderModel(T5Config(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                num_encoder_layers=1, num_decoder_layers=2, dtype="float32"))


def llama():
  return model_api.DecoderOnlyModel(LlamaConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                                                num_kv_heads=2, d_ff=64, dtype="float32"))


MODELS = {"t5": t5, "llama": llama}
MESH1 = None


def mesh1():
  global MESH1
  if MESH1 is None:
    MESH1 = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
  return MESH1


def _pairs(seed=0, n=20, num_inputs=4):
  rng = np.random.default_rng(seed)
  ins = [list(rng.integers(2, VOCAB, rng.integers(2, 20))) + [1] for _ in range(num_inputs)]
  inputs = [ins[i % num_inputs] for i in range(n)]
  targets = [list(rng.integers(2, VOCAB, rng.integers(1, 16))) + [1] for _ in range(n)]
  return inputs, targets


def _scorer(model, params, mesh=None, share=True, **kw):
  return scoring.PairScorer(model, params, mesh=mesh or mesh1(), batch_size=8, inputs_per_batch=4,
                            share_inputs=share, length_buckets=BUCKETS, **kw)


@pytest.fixture(scope="module", params=["t5", "llama"])
def model_and_params(request):
  model = MODELS[request.param]()
  return model, jax.jit(model.init)(jax.random.key(0))


def _reference_nll(model, params, inp, tgt):
  """One unpadded pair through the model's loss: mean token CE * tokens."""
  if isinstance(model, model_api.EncoderDecoderModel):
    t = np.asarray([tgt], np.int32)
    batch = {"encoder_input_tokens": np.asarray([inp], np.int32),
             "decoder_input_tokens": np.concatenate([[[0]], t[:, :-1]], 1).astype(np.int32),
             "decoder_target_tokens": t, "decoder_loss_weights": np.ones_like(t)}
  else:
    seq = np.asarray([inp + tgt], np.int32)
    w = np.asarray([[0] * len(inp) + [1] * len(tgt)], np.int32)
    batch = {"decoder_input_tokens": np.concatenate([[[0]], seq[:, :-1]], 1).astype(np.int32),
             "decoder_target_tokens": seq, "decoder_loss_weights": w}
  loss, m = model.loss_fn(params, batch, None)
  return float(loss) * float(m["num_tokens"])


def test_padding_never_counted_and_shared_equals_plain(model_and_params):
  model, params = model_and_params
  inputs, targets = _pairs()
  plain = _scorer(model, params, share=False).score(inputs, targets)
  shared = _scorer(model, params).score(inputs, targets)
  np.testing.assert_array_equal(plain.num_tokens, [len(t) for t in targets])
  # Same pair alone (7 padding rows, padded columns) vs inside full batches, vs the unpadded model loss.
  alone = _scorer(model, params, share=False).score(inputs[3:4], targets[3:4])
  alone_shared = _scorer(model, params).score(inputs[3:4], targets[3:4])
  ref = _reference_nll(model, params, inputs[3], targets[3])
  assert alone.stats["target_padding_fraction"] > 0.9
  np.testing.assert_allclose(alone.nll[0], ref, rtol=1e-5)
  np.testing.assert_allclose(plain.nll[3], ref, rtol=1e-5)
  np.testing.assert_allclose(alone_shared.nll[0], ref, rtol=1e-5)
  # Encode-once / prefix-cache path == plain path, pair by pair.
  np.testing.assert_allclose(shared.nll, plain.nll, rtol=1e-5)
  assert shared.stats["num_shapes"] == 1 and plain.stats["num_shapes"] == 1
  assert np.all(plain.nll > 0)


def test_automatic_slot_size_equals_plain(model_and_params):
  """Without `inputs_per_batch` the slot size is chosen from the data; the numbers are the plain path's."""
  model, params = model_and_params
  inputs, targets = _pairs(seed=2, n=30, num_inputs=3)
  plain = _scorer(model, params, share=False).score(inputs, targets)
  auto = scoring.PairScorer(model, params, mesh=mesh1(), batch_size=8, length_buckets=BUCKETS).score(inputs, targets)
  assert auto.stats["slot_rows"] in (1, 2, 4, 8)
  np.testing.assert_allclose(auto.nll, plain.nll, rtol=1e-5)


def test_choose_slot_rows():
  # CGL n-gram shape: one query, 2,570 spans of ~15 tokens, 21-token query, 256 rows per device.
  assert scoring.choose_slot_rows(np.array([2570]), 15.0, 21.0, 256) == 64
  # Docid CGL: 257 identifiers per query.
  assert scoring.choose_slot_rows(np.array([257, 257]), 6.0, 21.0, 256) == 32   # 9 slots x 32 rows
  # One target per input: one row per slot; idle inputs (0 targets) cost nothing.
  assert scoring.choose_slot_rows(np.array([1, 1, 0, 1]), 10.0, 20.0, 64) == 1
  # Only divisors of the per-device batch.
  assert 24 % scoring.choose_slot_rows(np.array([100]), 10.0, 5.0, 24) == 0


def test_sharded_equals_single_device(model_and_params):
  model, params = model_and_params
  assert jax.device_count() == 8
  inputs, targets = _pairs(seed=1, n=24, num_inputs=6)
  single = _scorer(model, params).score(inputs, targets)
  mesh = partitioning.make_mesh(2, 2, 2)
  sharded = _scorer(model, scoring.place_params(model, params, mesh), mesh=mesh).score(inputs, targets)
  np.testing.assert_allclose(sharded.nll, single.nll, rtol=2e-5)


def test_bad_sequences_are_input_errors():
  model = t5()
  scorer = _scorer(model, None)
  with pytest.raises(Exception, match="empty"):
    scorer.score([[5, 1]], [[]])
  with pytest.raises(Exception, match="negative id"):
    scorer.score([[5, -3, 1]], [[4, 1]])


# ------------------------------------------------------------------------------------------------------------
# CGL on a Cranfield subset


@pytest.fixture(scope="module")
def cranfield(cranfield_dir):
  coll = corpora.load(str(cranfield_dir))
  scheme = identifiers.build("ngram", coll, seed=0)
  vocab = seqio.SentencePieceVocabulary(toy_tasks.SPM)
  queries = [q for q in coll.queries if coll.positives(q.query_id)]
  return coll, scheme, vocab, queries


def _evaluate(model, params, cran, queries, negatives_path, n=256, **kw):
  coll, scheme, vocab, _ = cran
  return cgl_eval.evaluate_cgl(model, params, coll, scheme, vocab, queries, target_seed=0, num_negatives=n,
                               negatives_seed=3, negatives_path=str(negatives_path), input_length=32,
                               target_length=32, mesh=mesh1(), batch_size=256,
                               length_buckets=BUCKETS, **kw)


def test_tokenize_batch_is_seqio_tokenize_with_eos_after_trim(cranfield):
  _, scheme, vocab, queries = cranfield
  texts = [q.text for q in queries[:20]] + [scheme.retrieval_targets(queries[0].text, 0, 0)[0], ""]
  for max_length in (None, 1, 8, 32):
    keep = None if max_length is None else max_length - 1
    want = [list(vocab.encode(t))[:keep] + [vocab.eos_id] for t in texts]
    assert cgl_eval.tokenize_batch(vocab, texts, max_length) == want
    assert [cgl_eval.tokenize(vocab, t, max_length) for t in texts] == want


def test_identifiers_cached_for_later_evaluations(cranfield, tmp_path, monkeypatch, caplog):
  coll, scheme, vocab, queries = cranfield
  kw = dict(num_negatives=16, negatives_seed=3, negatives_path=str(tmp_path / "negatives.npz"), input_length=32,
            target_length=32)
  build = lambda seed=0, **more: cgl_eval.build_sequences(coll, scheme, vocab, queries[:2], target_seed=seed,
                                                         **kw, **more)
  plain = build()
  cache = tmp_path / "artefacts"
  first = build(targets_cache_dir=str(cache))
  (saved,) = cache.glob("cgl_targets_*.json.gz")

  def refuse(*a, **k):
    raise AssertionError("sampled instead of loaded")
  with monkeypatch.context() as m:
    m.setattr(type(scheme), "retrieval_targets_many", refuse)
    second = build(targets_cache_dir=str(cache))
  for s in (first, second):
    assert s.targets == plain.targets and s.inputs == plain.inputs
    for name in ("row_query", "row_doc_slot", "row_ident"):
      np.testing.assert_array_equal(getattr(s, name), getattr(plain, name))
  other_seed = build(seed=1, targets_cache_dir=str(cache))   # other pairs or seed: another file
  assert len(list(cache.glob("cgl_targets_*.json.gz"))) == 2 and other_seed.targets != plain.targets
  saved.write_bytes(b"not gzip")   # unreadable: sampled again, with a warning, and rewritten
  with caplog.at_level("WARNING"):
    assert build(targets_cache_dir=str(cache)).targets == plain.targets
  assert "sampling again" in caplog.text and saved.read_bytes()[:2] == b"\x1f\x8b"


def test_chance_level_and_negatives_shared_across_models(cranfield, tmp_path):
  model = t5()
  params = jax.jit(model.init)(jax.random.key(0))
  uniform = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "logits_dense" in jax.tree_util.keystr(p) else x, params)
  queries = cranfield[3][:1]
  neg_path = tmp_path / "negatives.npz"
  chance = _evaluate(model, uniform, cranfield, queries, neg_path)
  assert neg_path.exists()
  np.testing.assert_allclose(chance.result.cgl, [np.log(257 / 256)], rtol=1e-6)
  np.testing.assert_allclose(chance.result.mean, 0.0038986, atol=5e-8)
  np.testing.assert_allclose(chance.result.contrastive_entropy, [np.log(257)], rtol=1e-6)
  # 1 query x (its positives + 256 negatives) x 10 spans.
  n_pos = len(cranfield[0].positives(queries[0].query_id))
  assert chance.num_sequences == (n_pos + 256) * 10
  other = _evaluate(model, params, cranfield, queries, neg_path)
  assert other.negatives.fingerprint() == chance.negatives.fingerprint()
  np.testing.assert_array_equal(other.negatives.negatives, chance.negatives.negatives)
  assert other.result.mean != chance.result.mean
  # Positives never among the negatives; same seed without the file gives the same draw.
  pos = {cranfield[0].doc_index(d) for d in cranfield[0].positives(queries[0].query_id)}
  assert not pos & set(chance.negatives.negatives[0].tolist())
  again = cgl_eval.load_or_sample_negatives(None, len(cranfield[0].documents), [sorted(pos)],
                                            [queries[0].query_id], 256, 3,
                                            excluded=cgl_eval.documents_without_identifiers(cranfield[1]))
  np.testing.assert_array_equal(again.negatives, chance.negatives.negatives)
  with pytest.raises(Exception, match="other queries"):
    _evaluate(model, params, cranfield, cranfield[3][1:2], neg_path)


def _train_batches(cran, queries, rng):
  coll, scheme, vocab, _ = cran
  pairs = []
  for q in queries:
    for d in coll.positives(q.query_id):
      for t in scheme.retrieval_targets(q.text, coll.doc_index(d), 0):
        pairs.append((cgl_eval.tokenize(vocab, q.text, 32), cgl_eval.tokenize(vocab, t, 32)))
  while True:
    idx = rng.choice(len(pairs), 16, replace=False)
    enc = np.zeros((16, 32), np.int32)
    tgt = np.zeros((16, 32), np.int32)
    for i, j in enumerate(idx):
      enc[i, :len(pairs[j][0])] = pairs[j][0]
      tgt[i, :len(pairs[j][1])] = pairs[j][1]
    dec = np.concatenate([np.zeros((16, 1), np.int32), tgt[:, :-1]], 1)
    yield {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
           "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def test_trained_model_has_lower_cgl_than_init(cranfield, tmp_path):
  model = t5()
  params = jax.jit(model.init)(jax.random.key(1))
  queries = cranfield[3][:3]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  batches = _train_batches(cranfield, queries, np.random.default_rng(0))
  losses = []
  trained = params
  for _ in range(60):
    trained, opt, loss = step(trained, opt, next(batches))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  neg_path = tmp_path / "neg.json"
  before = _evaluate(model, params, cranfield, queries, neg_path, n=32)
  after = _evaluate(model, trained, cranfield, queries, neg_path, n=32)
  assert after.negatives.fingerprint() == before.negatives.fingerprint()
  assert after.result.mean < before.result.mean
  assert after.result.contrastive_entropy.mean() < before.result.contrastive_entropy.mean()
  assert np.all(after.result.ell_pos < before.result.ell_pos)


# ------------------------------------------------------------------------------------------------------------
# `genret cgl`


def model_gin(vocab: int) -> str:
  return toy_tasks.tiny_t5_model_gin(vocab, decoder_layers=2) + """models.get_model.model = %MODEL
MIXTURE_OR_TASK_NAME = "genret_cgltest_naive"
TASK_FEATURE_LENGTHS = {"inputs": 32, "targets": 32}
"""


def test_genret_cgl_command(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("GENRET_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("GENRET_REGISTER_DEFAULT_TASKS", "0")
  import tasks
  from genret_jax import cli
  names = tasks.register_collection_tasks("cgltest", "default", "naive", vocab_size=300)
  vocab_size = seqio.get_mixture_or_task(names["retrieval"]).output_features["targets"].vocabulary.vocab_size
  from genret_jax.models.t5 import T5Config as Cfg
  model = model_api.EncoderDecoderModel(Cfg(vocab_size=vocab_size, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                            num_encoder_layers=1, num_decoder_layers=2, dtype="float32"))
  ckpt = tmp_path / "run"
  params_io.save_params(str(ckpt), model.init(jax.random.key(0)), model_gin=model_gin(vocab_size))
  argv = ["cgl", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH=\"{ckpt}\"", "--gin.SPLIT=\"test\"",
          "--gin.NUM_NEGATIVES=16", "--gin.BATCH_SIZE=64", "--gin.genret.cgl_eval_run.max_queries=4",
          "--gin.genret.cgl_eval_run.bootstrap_resamples=200", "--gin.genret.cgl_eval_run.progress=False"]
  assert cli.main(argv) == 0
  out = json.loads((ckpt / "cgl_test.json").read_text())
  s = out["summary"]
  assert s["num_queries"] == 4 and s["num_negatives"] == 16
  assert s["cgl_ci"][0] <= s["cgl"] <= s["cgl_ci"][1]
  assert len(out["per_query"]["cgl"]) == 4 and len(out["per_query"]["query_ids"]) == 4
  assert out["inputs_checked_against_task"] > 0
  neg_file = tmp_path / "run" / "negatives_test_n16_s0.npz"
  assert neg_file.exists() and out["negatives"]["fingerprint"] == cgl.NegativeSet.load(neg_file).fingerprint()
  # Bad config: a clear one-line error, exit 2, before anything is scored.
  assert cli.main(["cgl", "--gin_file=runs/eval.gin"]) == 2
  capsys.readouterr()
  assert cli.main([*argv, "--gin.NUM_NEGATIVES=-1"]) == 2
  assert "config key NUM_NEGATIVES: must be an integer >= 1" in capsys.readouterr().err
  assert cli.main([*argv, "--gin.genret.cgl_eval_run.averaging=\"bogus\""]) == 2
  assert "unknown averaging 'bogus'" in capsys.readouterr().err


def test_saved_negatives_of_another_seed_or_count_are_refused(cranfield, tmp_path):
  """A sweep's negatives.json was reused after `negatives_seed` or `num_negatives` changed, while the results
  recorded the new values."""
  coll, _, _, queries = cranfield
  ids = [q.query_id for q in queries[:3]]
  pos = [[coll.doc_index(d) for d in coll.positives(q)] for q in ids]
  path = str(tmp_path / "negatives.json")
  first = cgl_eval.load_or_sample_negatives(path, len(coll.documents), pos, ids, 8, seed=0)
  again = cgl_eval.load_or_sample_negatives(path, len(coll.documents), pos, ids, 8, seed=0)
  np.testing.assert_array_equal(first.negatives, again.negatives)
  with pytest.raises(InputError, match="negatives.json: .*seed 0, this evaluation asks for seed 1"):
    cgl_eval.load_or_sample_negatives(path, len(coll.documents), pos, ids, 8, seed=1)
  with pytest.raises(InputError, match="hold 8 per query, this evaluation asks for 16"):
    cgl_eval.load_or_sample_negatives(path, len(coll.documents), pos, ids, 16, seed=0)
