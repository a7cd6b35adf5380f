"""convert-hf and each Hugging Face config.json field that changes the computation: a supported one converts to
the logits transformers computes from the same directory (its own reading of config.json, reloaded with
`from_pretrained`), an unsupported one is refused with one InputError naming config.json and the key (several
were converted silently into another model). Tiny random models, nothing downloaded."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from genret_jax.errors import InputError
from genret_jax.models import hf_convert
from genret_jax.models.model_api import DecoderOnlyModel, EncoderDecoderModel

V = 64
_DROP = object()   # _patch: remove the key


def _patch(d, **values):
  cfg = json.loads((d / "config.json").read_text())
  for k, v in values.items():
    if v is _DROP:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  (d / "config.json").write_text(json.dumps(cfg))


def _randomise(model):
  with torch.no_grad():  # HF's init leaves some tensors tiny; randomise so every weight and option matters
    for p in model.parameters():
      p.normal_(0.0, 0.3)


# ---- LLaMA -----------------------------------------------------------------------------------------------------
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)


def _save_llama(d, patch=None, **kw):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **kw}))
  _randomise(model)
  model.save_pretrained(d)
  if patch:
    _patch(d, **patch)


def _llama_parity(d):
  hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()   # transformers' own reading of config.json
  config, params = hf_convert.load_hf(d, dtype="float32")
  ids = np.random.RandomState(1).randint(1, V, (2, 9))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  ours = DecoderOnlyModel(config)._logits(params, {"decoder_input_tokens": jnp.asarray(ids, jnp.int32)}, None)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  return config


LLAMA_SUPPORTED = {
    # transformers 5 writes rope_theta into rope_parameters, 4.x at the top level (rope_scaling null)
    "rope_theta_in_rope_parameters": (dict(rope_parameters={"rope_type": "default", "rope_theta": 50.0}), None),
    "rope_theta_top_level": (dict(), dict(rope_parameters=_DROP, rope_theta=50.0, rope_scaling=None)),
    "rms_norm_eps": (dict(rms_norm_eps=0.5), None),
    "head_dim_not_hidden_over_heads": (dict(head_dim=12), None),
    "hidden_act_swish": (dict(hidden_act="swish"), None),   # the same function as silu; was refused
    "pretraining_tp": (dict(pretraining_tp=2), None),       # transformers 5 ignores it, 4.x split equal matmuls
    "tied": (dict(tie_word_embeddings=True), None),
}


@pytest.mark.parametrize("case", list(LLAMA_SUPPORTED))
def test_llama_supported_option_matches_hf(tmp_path, case):
  kw, patch = LLAMA_SUPPORTED[case]
  _save_llama(tmp_path, patch, **kw)
  config = _llama_parity(tmp_path)
  if case.startswith("rope_theta"):
    assert config.rope_theta == 50.0
  if case == "head_dim_not_hidden_over_heads":
    assert config.head_dim == 12


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}
LLAMA_REFUSED = {
    "rope_llama3": (dict(rope_parameters=LLAMA3), "rope_parameters"),
    "rope_linear": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters"),
    "rope_dynamic": (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_parameters"),
    "rope_yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
    # transformers reads the legacy rope_scaling before rope_parameters: this was converted as default RoPE
    "legacy_rope_scaling_wins": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    "legacy_rope_scaling_llama3": (dict(rope_parameters=_DROP, rope_scaling=LLAMA3), "rope_scaling"),
    "partial_rotary_factor": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                    "partial_rotary_factor": 0.5}), "rope_parameters"),
    "partial_rotary_factor_top_level": (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "hidden_act_gelu": (dict(hidden_act="gelu"), "hidden_act"),
    "attention_bias": (dict(attention_bias=True), "attention_bias"),
    "mlp_bias": (dict(mlp_bias=True), "mlp_bias"),   # was reported as attention_bias
    "attention_dropout": (dict(attention_dropout=0.1), "attention_dropout"),
    "missing_size": (dict(hidden_size=_DROP), "hidden_size"),   # was a KeyError traceback
}


@pytest.mark.parametrize("case", list(LLAMA_REFUSED))
def test_llama_unsupported_option_is_refused(tmp_path, case):
  patch, key = LLAMA_REFUSED[case]
  transformers.LlamaConfig(**LLAMA).save_pretrained(tmp_path)   # refused before any weight is read
  _patch(tmp_path, **patch)
  with pytest.raises(InputError) as e:
    hf_convert.load_hf(tmp_path, dtype="float32")
  assert e.value.path == str(tmp_path / "config.json") and e.value.key == key
  assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {key}: ")


def test_convert_hf_cli_names_config_json_and_key(tmp_path, capsys):
  from genret_jax import cli
  _save_llama(tmp_path / "hf", dict(rope_parameters=LLAMA3))
  capsys.readouterr()
  assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"{tmp_path / 'hf' / 'config.json'}: rope_parameters: rope_type 'llama3'" in err, err
  assert not (tmp_path / "out").exists()


# ---- T5 --------------------------------------------------------------------------------------------------------
T5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=40, num_layers=1, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
          decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _save_t5(d, patch=None, **kw):
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**T5, **kw}))
  _randomise(model)
  model.save_pretrained(d)
  if patch:
    _patch(d, **patch)


def _t5_parity(d):
  hf = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
  config, params = hf_convert.load_hf(d, dtype="float32")
  rng = np.random.RandomState(0)
  enc = np.zeros((2, 9), np.int64)
  enc[0], enc[1, :4] = rng.randint(2, V, 9), rng.randint(2, V, 4)
  dec_in = np.concatenate([np.zeros((2, 1), np.int64), rng.randint(2, V, (2, 4))], 1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
             decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
  batch = {"encoder_input_tokens": jnp.asarray(enc, jnp.int32), "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32)}
  np.testing.assert_allclose(np.asarray(EncoderDecoderModel(config)._logits(params, batch, None)), ref,
                             atol=1e-4, rtol=1e-4)
  return config


T5_SUPPORTED = {
    "layer_norm_epsilon": (dict(layer_norm_epsilon=0.5), None),
    "d_kv_times_heads_not_d_model": (dict(num_heads=3, d_kv=16), None),
    "gated_silu": (dict(feed_forward_proj="gated-silu"), None),
    "gated_relu": (dict(feed_forward_proj="gated-relu"), None),
    "gelu_exact": (dict(feed_forward_proj="gelu"), None),
    "gelu_new": (dict(feed_forward_proj="gelu_new"), None),
    "gated_gelu_pytorch_tanh": (dict(feed_forward_proj="gated-gelu_pytorch_tanh"), None),
    "swish": (dict(feed_forward_proj="swish"), None),
    "v1_0_tied_scaled": (dict(feed_forward_proj="relu", tie_word_embeddings=True), None),
    # a null scale_decoder_outputs is no rescaling to transformers; it was read as "rescale iff tied"
    "scale_decoder_outputs_null": (dict(feed_forward_proj="relu", tie_word_embeddings=True),
                                   dict(scale_decoder_outputs=None)),
    "buckets_and_max_distance": (dict(relative_attention_num_buckets=12, relative_attention_max_distance=6), None),
}


@pytest.mark.parametrize("case", list(T5_SUPPORTED))
def test_t5_supported_option_matches_hf(tmp_path, case):
  kw, patch = T5_SUPPORTED[case]
  _save_t5(tmp_path, patch, **kw)
  _t5_parity(tmp_path)


T5_REFUSED = {
    "feed_forward_proj_malformed": (dict(feed_forward_proj="foo-relu"), "feed_forward_proj"),   # was plain relu
    "feed_forward_proj_unknown_act": (dict(feed_forward_proj="gated-quick_gelu", dense_act_fn="quick_gelu"),
                                      "feed_forward_proj"),
    # transformers uses config.json's dense_act_fn / is_gated_act over feed_forward_proj; ours used the latter
    "dense_act_fn_contradicts": (dict(dense_act_fn="relu"), "dense_act_fn"),
    "is_gated_act_contradicts": (dict(is_gated_act=False), "is_gated_act"),
    "decoder_start_token_id": (dict(decoder_start_token_id=2), "decoder_start_token_id"),
    # as MT5Config writes it: transformers 5 does not rescale, 4 did, and this was imported rescaled
    "mt5_tied": (dict(model_type="mt5", tie_word_embeddings=True, scale_decoder_outputs=_DROP), "tie_word_embeddings"),
    "missing_size": (dict(d_model=_DROP), "d_model"),   # was a KeyError traceback
}


@pytest.mark.parametrize("case", list(T5_REFUSED))
def test_t5_unsupported_option_is_refused(tmp_path, case):
  patch, key = T5_REFUSED[case]
  transformers.T5Config(**T5).save_pretrained(tmp_path)
  _patch(tmp_path, **patch)
  with pytest.raises(InputError) as e:
    hf_convert.load_hf(tmp_path, dtype="float32")
  assert e.value.path == str(tmp_path / "config.json") and e.value.key == key
  assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {key}: ")


def test_t5_dropout_default_is_transformers(tmp_path):
  """A config.json without dropout_rate trains with transformers' 0.1; it was imported as 0.0."""
  transformers.T5Config(**T5).save_pretrained(tmp_path)
  _patch(tmp_path, dropout_rate=_DROP)
  assert transformers.T5Config.from_pretrained(tmp_path).dropout_rate == 0.1
  assert hf_convert.config_from_hf(hf_convert.read_hf_config(tmp_path)).dropout_rate == 0.1
