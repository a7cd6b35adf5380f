"""Parameter counts (paper convention), FLOPs formulas, gin size configs and the CPU ladder."""

import pathlib

import jax
import jax.numpy as jnp
import pytest

from genret_jax import gin_utils
from genret_jax.models import accounting
from genret_jax.models import layers as L
from genret_jax.models.llama import LlamaConfig
from genret_jax.models.model_api import DecoderOnlyModel, EncoderDecoderModel, get_model
from genret_jax.models.t5 import T5Config

GIN_DIR = pathlib.Path(gin_utils.PACKAGE_GIN_DIR) / "models"


def _config(gin_file: str):
  gin_utils.parse_gin([str(GIN_DIR / gin_file)], [])
  return get_model().config


def test_t5_small_counts_match_the_paper():
  counts = accounting.count_params(_config("t5_1_0/small.gin"))
  assert (counts.total, counts.non_embedding) == (60_506_624, 44_057_088)


def test_llama2_7b_counts_match_the_paper():
  config = _config("llama/7b.gin")
  counts = accounting.count_params(config)
  assert (counts.total, counts.non_embedding) == (6_738_415_616, 6_607_343_616)
  # dense forward FLOPs are exactly 2 x the matmul params a token touches (N minus lm head minus norm scales)
  flops = accounting.forward_flops_per_token(config, context=1)
  matmul = counts.non_embedding - config.vocab_size * config.d_model - (2 * config.num_layers + 1) * config.d_model
  assert flops.dense == 2 * matmul
  assert flops.embedding == 2 * config.vocab_size * config.d_model


@pytest.mark.parametrize("size,layers", [("tiny", 2), ("small", 8), ("base", 12), ("large", 24), ("xl", 24),
                                         ("xxl", 24)])
def test_t5_1_1_sizes_parse(size, layers):
  config = _config(f"t5_1_1/{size}.gin")
  assert isinstance(config, T5Config) and config.num_encoder_layers == layers
  assert config.mlp_activations == ("gelu", "linear") and not config.tie_word_embeddings


def test_t5_1_1_base_count():
  # google/t5-v1_1-base has 247,577,856 parameters (shared embedding + untied lm_head).
  assert accounting.count_params(_config("t5_1_1/base.gin")).total == 247_577_856


@pytest.mark.parametrize("size", ["tiny", "13b", "70b"])
def test_llama_sizes_parse(size):
  assert isinstance(_config(f"llama/{size}.gin"), LlamaConfig)


def test_llama2_13b_70b_counts():
  assert accounting.count_params(_config("llama/13b.gin")).total == 13_015_864_320
  assert accounting.count_params(_config("llama/70b.gin")).total == 68_976_648_192


def test_cpu_ladder_matched_and_spanning():
  ns = []
  for r in range(6):
    t5 = accounting.count_params(_config(f"t5_1_1/cpu_ladder/r{r}.gin")).non_embedding
    ll = accounting.count_params(_config(f"llama/cpu_ladder/r{r}.gin")).non_embedding
    assert abs(t5 - ll) / t5 < 0.02, (r, t5, ll)
    ns.append(t5)
  assert ns == sorted(ns) and 0.05e6 < ns[0] < 0.2e6 and 15e6 < ns[-1] < 25e6


def test_flops_training_is_three_forward_and_decode_step_is_cheaper():
  config = _config("t5_1_1/small.gin")
  fwd = accounting.forward_flops_per_example(config, 64, 16)
  train = accounting.train_flops_per_example(config, 64, 16)
  assert train.total == pytest.approx(3 * fwd.total)
  step = accounting.decode_step_flops(config, context=16, inputs_length=64)
  assert 0 < step.total < fwd.total / 16
  summary = accounting.summary(config)
  assert summary["params_total"] > summary["params_non_embedding"] > 0


def test_demo_ladder_matched_and_growing():
  ns = []
  for r in range(4):
    t5 = accounting.count_params(_config(f"t5_1_1/demo_ladder/d{r}.gin")).non_embedding
    ll = accounting.count_params(_config(f"llama/demo_ladder/d{r}.gin")).non_embedding
    assert abs(t5 - ll) / t5 < 0.02, (r, t5, ll)
    ns.append(t5)
  assert ns == sorted(ns) and ns[-1] / ns[0] > 8


def _xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_flops_match_xla_count(family):
  """The formulas against XLA's own count of the compiled forward pass, decode init and decode step (d_model 256,
  so the elementwise ops XLA also counts stay under ~2%): one d_model x d_model projection left out of a formula is a
  gap of ~7% at this size, against the 2% tolerance."""
  batch, lin, lt, cache_len = 4, 16, 8, 8
  if family == "t5":
    config = T5Config(vocab_size=1024, d_model=256, num_heads=4, head_dim=64, d_ff=512, num_encoder_layers=2,
                      num_decoder_layers=2, dtype="float32")
    model = EncoderDecoderModel(config)
    fwd_batch = {"encoder_input_tokens": jnp.ones((batch, lin), jnp.int32),
                 "decoder_input_tokens": jnp.ones((batch, lt), jnp.int32)}
  else:
    config = LlamaConfig(vocab_size=1024, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=512,
                         dtype="float32")
    model = DecoderOnlyModel(config)
    fwd_batch = {"decoder_input_tokens": jnp.ones((batch, lin + lt), jnp.int32)}
  params = model.init(jax.random.PRNGKey(0))
  inputs = jnp.ones((batch, lin), jnp.int32)

  forward = _xla_flops(lambda p, b: model._logits(p, b, None), params, fwd_batch) / batch
  expected = (accounting.forward_flops_per_example(config, lin, lt) if family == "t5"
              else accounting.forward_flops_per_example(config, lin + lt, 0))
  assert expected.total == pytest.approx(forward, rel=0.02)

  init = _xla_flops(lambda p, x: model.decode_init(p, x, cache_len), params, inputs) / batch
  # T5: the encoder and the cross-attention K/V; LLaMA: the prefill of Lin prompt columns, K/V only at the last layer.
  expected_init = accounting.decode_init_flops(config, lin)
  # LLaMA's prefill and steps take their rotary positions on the device (the identity products on CPU).
  on_cpu = family == "llama" and jax.default_backend() == "cpu"
  rotary = (lambda n: L.rotary_identity_flops(n, config.head_dim)) if on_cpu else (lambda n: 0)
  assert expected_init.total + rotary(lin) == pytest.approx(init, rel=0.02)

  cache, first = jax.jit(lambda p, x: model.decode_init(p, x, cache_len))(params, inputs)
  step = _xla_flops(lambda p, c, t: model.tokens_to_logits(p, c, t, 0), params, cache, first) / batch
  # The step attends over every cache slot (masked), so XLA counts the full cache as context.
  context = cache_len if family == "t5" else lin + cache_len
  expected_step = accounting.decode_step_flops(config, context, lin)
  assert expected_step.total + rotary(1) == pytest.approx(step, rel=0.02)
