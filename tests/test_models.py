"""Model families: incremental decoding == full forward, scan == loop, loss / score semantics, packing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genret_jax.models import layers as L
from genret_jax.models.llama import LlamaConfig
from genret_jax.models.model_api import DecoderOnlyModel, EncoderDecoderModel
from genret_jax.models.t5 import T5Config

V = 64
T5_CFG = T5Config(vocab_size=V, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
                  num_decoder_layers=2, dtype="float32")
LLAMA_CFG = LlamaConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                        dtype="float32")


def random_params(model, seed):
  """Random params from the abstract shapes (numpy, so no XLA compile of the init's random ops on CPU)."""
  rng = np.random.RandomState(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), abstract)


class Jitted:
  """The model's entry points, jitted once per test module (XLA:CPU compiles are the test-time cost)."""

  def __init__(self, model):
    self.model = model
    self.logits = jax.jit(lambda p, b: model._logits(p, b, None))
    self.decode_init = jax.jit(model.decode_init, static_argnums=2)
    self.step = jax.jit(model.tokens_to_logits)
    self.score = jax.jit(model.score_batch)
    self.loss = jax.jit(lambda p, b: model.loss_fn(p, b, None))
    self.greedy = jax.jit(model.greedy_decode, static_argnums=(2, 3))


@pytest.fixture(scope="module")
def t5():
  # Explicit z_loss / label smoothing: a gin file parsed by an earlier test in this worker may bind them.
  model = EncoderDecoderModel(T5_CFG, z_loss=0.0, label_smoothing=0.0)
  return Jitted(model), random_params(model, 0)


@pytest.fixture(scope="module")
def llama():
  model = DecoderOnlyModel(LLAMA_CFG, z_loss=0.0, label_smoothing=0.0)
  return Jitted(model), random_params(model, 1)


def _inputs():
  rng = np.random.RandomState(0)
  inputs = np.zeros((3, 6), np.int32)
  for b, n in enumerate([6, 3, 1]):  # right-padded, different lengths
    inputs[b, :n] = rng.randint(2, V, n)
  return inputs


def _full_logits(jm, params, inputs, dec_tokens):
  """Teacher-forced logits [B, steps, V] at the decoded positions (right padding never affects them)."""
  steps = dec_tokens.shape[1]
  dec_in = np.concatenate([np.zeros((len(inputs), 1), np.int32), dec_tokens[:, :-1]], 1)
  if isinstance(jm.model, EncoderDecoderModel):
    return np.asarray(jm.logits(params, {"encoder_input_tokens": inputs, "decoder_input_tokens": dec_in}))
  seqs = np.zeros((len(inputs), inputs.shape[1] + steps), np.int32)
  ns = (inputs > 0).sum(1)
  for b, n in enumerate(ns):  # [0, prompt, continuation...] per row, right-padded
    seqs[b, 1:1 + n] = inputs[b, :n]
    seqs[b, 1 + n:1 + n + steps - 1] = dec_tokens[b, :-1]
  full = np.asarray(jm.logits(params, {"decoder_input_tokens": seqs}))
  return np.stack([full[b, n:n + steps] for b, n in enumerate(ns)])


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_incremental_decode_equals_full_forward(family, request):
  jm, params = request.getfixturevalue(family)
  inputs, steps = _inputs(), 5
  cache, tok = jm.decode_init(params, inputs, steps)
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == inputs.shape[0]  # beam search contract: batch leads every leaf
  # random (not greedy) continuation so every step's logits are checked on arbitrary tokens
  fed = np.random.RandomState(1).randint(2, V, (3, steps)).astype(np.int32)
  step_logits = []
  for s in range(steps):
    logits, cache = jm.step(params, cache, jnp.asarray(tok if s == 0 else fed[:, s - 1]), s)
    assert logits.shape == (3, V) and logits.dtype == jnp.float32
    step_logits.append(np.asarray(logits))
  np.testing.assert_allclose(np.stack(step_logits, 1), _full_logits(jm, params, inputs, fed), atol=1e-4,
                             rtol=1e-4)
  greedy = np.asarray(jm.greedy(params, inputs, steps, -1))
  np.testing.assert_array_equal(greedy, np.argmax(_full_logits(jm, params, inputs, greedy), -1))


def test_beam_style_cache_gather_keeps_rows_independent(llama):
  jm, params = llama
  inputs = _inputs()
  cache, tok = jm.decode_init(params, inputs, 5)
  order = np.array([2, 0, 1])  # repeat and reorder rows the way the beam search does
  cache_g = jax.tree.map(lambda x: x[order], cache)
  logits_g, _ = jm.step(params, cache_g, tok[order], 0)
  logits, _ = jm.step(params, cache, tok, 0)
  np.testing.assert_allclose(np.asarray(logits_g), np.asarray(logits)[order], atol=1e-5)


def test_scan_layers_equals_loop(llama):
  jm, params = llama
  scanned = DecoderOnlyModel(dataclasses.replace(LLAMA_CFG, scan_layers=True, remat_policy="full"))
  sparams = L.stack_layer_params(params)
  assert jax.tree.structure(sparams) == jax.tree.structure(
      jax.tree.map(lambda x: 0, scanned.abstract_params(), is_leaf=lambda x: hasattr(x, "names")))
  tokens = jnp.asarray(np.random.RandomState(2).randint(1, V, (2, 7)), jnp.int32)
  batch = {"decoder_input_tokens": tokens}
  np.testing.assert_allclose(jax.jit(lambda p: scanned._logits(p, batch, None))(sparams),
                             jm.logits(params, batch), atol=1e-5)
  inputs = _inputs()
  logits, cache = jax.jit(lambda p: scanned.tokens_to_logits(p, *scanned.decode_init(p, inputs, 5), 0))(sparams)
  for leaf in jax.tree.leaves(cache):
    assert leaf.shape[0] == inputs.shape[0]
  cache_ref, tok_ref = jm.decode_init(params, inputs, 5)
  ref, _ = jm.step(params, cache_ref, tok_ref, 0)
  np.testing.assert_allclose(logits, ref, atol=1e-5)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   L.unstack_layer_params(sparams), params))


def test_t5_scan_layers_equals_loop(t5):
  jm, params = t5
  scanned = EncoderDecoderModel(dataclasses.replace(T5_CFG, scan_layers=True))
  batch = {"encoder_input_tokens": jnp.asarray(_inputs()),
           "decoder_input_tokens": jnp.asarray([[0, 5, 6, 7, 8]] * 3, jnp.int32)}
  np.testing.assert_allclose(jax.jit(lambda p: scanned._logits(p, batch, None))(L.stack_layer_params(params)),
                             jm.logits(params, batch), atol=1e-5)


def _prefix_lm_example(inputs, targets, length):
  seq = list(inputs) + list(targets)
  tgt = np.zeros(length, np.int32)
  tgt[:len(seq)] = seq
  dec_in = np.zeros(length, np.int32)
  dec_in[1:len(seq)] = seq[:-1]
  w = np.zeros(length, np.int32)
  w[len(inputs):len(seq)] = 1
  return dec_in, tgt, w


def test_prefix_lm_loss_and_score_count_only_targets(llama):
  jm, params = llama
  rows = [_prefix_lm_example([5, 6, 7], [9, 10, 1], 10), _prefix_lm_example([11], [12, 1], 10)]
  batch = {k: jnp.asarray(np.stack([r[i] for r in rows]))
           for i, k in enumerate(["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"])}
  total, mean = jm.score(params, batch)
  logp = jax.nn.log_softmax(jm.logits(params, batch), -1)
  for b in range(2):
    w = np.asarray(batch["decoder_loss_weights"][b])
    per_tok = np.take_along_axis(np.asarray(logp[b]), np.asarray(batch["decoder_target_tokens"][b])[:, None],
                                 -1)[:, 0]
    np.testing.assert_allclose(total[b], (per_tok * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(mean[b], (per_tok * w).sum() / w.sum(), rtol=1e-5)
  loss, metrics = jm.loss(params, batch)
  np.testing.assert_allclose(loss, -np.sum(np.asarray(total)) / 5.0, rtol=1e-5)
  assert float(metrics["num_tokens"]) == 5.0
  # changing a prompt-only target token does not change the score (it has weight 0)
  batch2 = dict(batch, decoder_target_tokens=batch["decoder_target_tokens"].at[0, 0].set(33))
  np.testing.assert_allclose(jm.score(params, batch2)[0], total, rtol=1e-6)


def test_prefix_lm_loss_positions_equal_full_logits(llama):
  """Logits only at the first P weighted positions give the same loss and gradients as every position; a row with
  more weighted tokens than P is counted (`dropped_tokens`), never cut silently; scores never depend on P."""
  _, params = llama
  full = DecoderOnlyModel(LLAMA_CFG, z_loss=1e-4, label_smoothing=0.0)
  part = DecoderOnlyModel(LLAMA_CFG, z_loss=1e-4, label_smoothing=0.0, loss_positions=4)
  rows = [_prefix_lm_example([5, 6, 7], [9, 10, 1], 12), _prefix_lm_example([11], [12, 13, 14, 1], 12),
          _prefix_lm_example([3, 4, 5, 6, 7, 8], [2, 1], 12)]
  batch = {k: jnp.asarray(np.stack([r[i] for r in rows]))
           for i, k in enumerate(["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"])}
  # jitted: op-by-op eager execution compiles every primitive on CPU (tens of seconds here)
  run = lambda m: jax.jit(lambda p: (jax.value_and_grad(lambda q: m.loss_fn(q, batch, None), has_aux=True)(p),
                                     m.score_batch(p, batch)[0]))(params)
  ((l1, m1), g1), s1 = run(full)
  ((l2, m2), g2), s2 = run(part)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  np.testing.assert_allclose(m2["accuracy"], m1["accuracy"])
  assert float(m2["num_tokens"]) == float(m1["num_tokens"]) == 9.0 and float(m2["dropped_tokens"]) == 0.0
  np.testing.assert_allclose(s2, s1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  tight = DecoderOnlyModel(LLAMA_CFG, loss_positions=3)   # row 1 has 4 target tokens
  ((_, m3), _), scores = run(tight)
  assert float(m3["dropped_tokens"]) == 1.0
  np.testing.assert_allclose(scores, s1, rtol=1e-6)


@pytest.mark.parametrize("family,tied", [("t5", True), ("t5", False), ("llama", False)])
def test_chunked_vocab_projection_equals_one_projection(family, tied):
  """Loss (with z-loss and label smoothing), its gradients, accuracy and scores are the same whether the
  vocabulary projection runs in one piece or chunk by chunk (`logits_chunk_tokens`; 5 tokens per chunk over 3 rows
  of 7 positions: 1 position per chunk, the last chunk padded), tied or untied output embedding."""
  base = dataclasses.replace(T5_CFG if family == "t5" else LLAMA_CFG, tie_word_embeddings=tied)
  cls = EncoderDecoderModel if family == "t5" else DecoderOnlyModel
  one = cls(dataclasses.replace(base, logits_chunk_tokens=0), z_loss=1e-3, label_smoothing=0.1)
  chunked = cls(dataclasses.replace(base, logits_chunk_tokens=5), z_loss=1e-3, label_smoothing=0.1)
  params = random_params(one, 3)
  rng = np.random.RandomState(1)
  targets = rng.randint(1, V, (3, 7)).astype(np.int32)
  targets[1, 5:] = 0
  batch = {"decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.int32),
           "decoder_input_tokens": np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], 1)}
  if family == "t5":
    batch["encoder_input_tokens"] = rng.randint(1, V, (3, 5)).astype(np.int32)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  run = lambda m: jax.jit(lambda p: (jax.value_and_grad(lambda q: m.loss_fn(q, batch, None), has_aux=True)(p),
                                     m.score_batch(p, batch)))(params)
  ((l1, m1), g1), s1 = run(one)
  ((l2, m2), g2), s2 = run(chunked)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for key in ("cross_ent_loss", "z_loss", "accuracy", "num_tokens"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
  for a, b in zip(s1, s2):
    np.testing.assert_allclose(b, a, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_projected_token_stats_match_log_softmax():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(size=(4, 9, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
  t = jnp.asarray(rng.randint(0, 11, (4, 9)), jnp.int32)
  logits = np.asarray(x @ w, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for chunk in (0, 4, 8, 13, 36, 1000):
    stats = jax.jit(lambda x, w, t, c=chunk: L.projected_token_stats(lambda h: h @ w, x, t, c))(x, w, t)
    np.testing.assert_allclose(stats.log_prob, np.take_along_axis(logp, np.asarray(t)[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.mean_log_prob, logp.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(stats.log_z, logits[..., 0] - logp[..., 0], rtol=1e-5)
    np.testing.assert_array_equal(stats.correct, logits.argmax(-1) == np.asarray(t))


def test_packed_equals_unpacked(t5):
  jm, params = t5
  enc = [[5, 6, 7, 1], [8, 9, 1]]
  dec = [[10, 11, 1], [12, 1]]

  def single(e, d):
    b = {"encoder_input_tokens": jnp.asarray([e]), "decoder_target_tokens": jnp.asarray([d]),
         "decoder_input_tokens": jnp.asarray([[0] + d[:-1]]), "decoder_loss_weights": jnp.ones((1, len(d)))}
    return float(jm.score(params, b)[0][0])

  packed = {
      "encoder_input_tokens": jnp.asarray([enc[0] + enc[1] + [0]]),
      "encoder_segment_ids": jnp.asarray([[1] * 4 + [2] * 3 + [0]]),
      "decoder_target_tokens": jnp.asarray([dec[0] + dec[1] + [0]]),
      "decoder_input_tokens": jnp.asarray([[0] + dec[0][:-1] + [0] + dec[1][:-1] + [0]]),
      "decoder_segment_ids": jnp.asarray([[1] * 3 + [2] * 2 + [0]]),
      "decoder_positions": jnp.asarray([[0, 1, 2, 0, 1, 0]]),
      "decoder_loss_weights": jnp.asarray([[1, 1, 1, 1, 1, 0]]),
  }
  logp = jax.nn.log_softmax(jm.logits(params, packed), -1)[0]
  tok_lp = np.take_along_axis(np.asarray(logp), np.asarray(packed["decoder_target_tokens"][0])[:, None], -1)[:, 0]
  np.testing.assert_allclose(tok_lp[:3].sum(), single(enc[0], dec[0]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tok_lp[3:5].sum(), single(enc[1], dec[1]), rtol=1e-4, atol=1e-5)


def test_llama_packed_equals_unpacked(llama):
  """Packed rows carry device-side positions, so the rotary tables are computed on the device (the identity
  product on CPU), not taken from host constants as for an unpacked row."""
  jm, params = llama
  seqs = [[5, 6, 7, 8, 1], [9, 10, 1]]

  def single(s):
    b = {"decoder_input_tokens": jnp.asarray([[0] + s[:-1]]), "decoder_target_tokens": jnp.asarray([s]),
         "decoder_loss_weights": jnp.ones((1, len(s)))}
    return np.asarray(jax.nn.log_softmax(jm.logits(params, b), -1))[0]

  packed = {"decoder_input_tokens": jnp.asarray([[0] + seqs[0][:-1] + [0] + seqs[1][:-1] + [0]]),
            "decoder_segment_ids": jnp.asarray([[1] * 5 + [2] * 3 + [0]]),
            "decoder_positions": jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 0]])}
  logp = np.asarray(jax.nn.log_softmax(jm.logits(params, packed), -1))[0]
  np.testing.assert_allclose(logp[:5], single(seqs[0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logp[5:8], single(seqs[1]), rtol=1e-5, atol=1e-5)


def test_rotary_tables_on_device_equal_host_constants():
  host = L.rotary_tables(None, 16, 1e4, 300)
  device = jax.jit(lambda p: L.rotary_tables(p, 16, 1e4))(jnp.arange(300)[None])
  for a, b in zip(host, device):
    assert a.shape == b.shape == (1, 300, 1, 16)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6)


def test_dropout_is_seeded_and_bf16_compute_runs():
  cfg = dataclasses.replace(LLAMA_CFG, num_layers=1, dropout_rate=0.5, dtype="bfloat16")
  model = DecoderOnlyModel(cfg)
  params = random_params(model, 3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # param_dtype stays fp32 under bf16
  batch = {"decoder_input_tokens": jnp.asarray([[0, 4, 5, 6]]), "decoder_target_tokens": jnp.asarray([[4, 5, 6, 1]]),
           "decoder_loss_weights": jnp.asarray([[0, 1, 1, 1]])}
  loss = jax.jit(lambda p, r: model.loss_fn(p, batch, r)[0])
  a, b = loss(params, jax.random.key(7)), loss(params, jax.random.key(7))
  c = jax.jit(lambda p: model.loss_fn(p, batch, None)[0])(params)
  assert float(a) == float(b) and float(a) != float(c) and np.isfinite(float(c))


def test_bad_sizes_and_dtypes_are_named_by_their_gin_key():
  """A negative d_model failed as a gather's slice size, dtype 'float13' at the first matmul."""
  from genret_jax.errors import InputError
  from genret_jax.models.llama import LlamaConfig
  from genret_jax.models.t5 import T5Config
  with pytest.raises(InputError, match="config key models.T5Config.d_model: must be an integer >= 1"):
    T5Config(d_model=-64)
  with pytest.raises(InputError, match="config key models.T5Config.vocab_size"):
    T5Config(vocab_size="32128")
  with pytest.raises(InputError, match="config key models.LlamaConfig.dtype: unknown dtype 'float13'"):
    LlamaConfig(dtype="float13")
  with pytest.raises(InputError, match="config key models.LlamaConfig.remat_policy"):
    LlamaConfig(remat_policy="sometimes")
