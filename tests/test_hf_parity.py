"""Hugging Face parity: random tiny HF models -> ours give the same logits / losses, incremental decode == full
forward, and our export loads back into HF with the same logits. Nothing is downloaded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from genret_jax.errors import InputError
from genret_jax.models import hf_convert
from genret_jax.models.model_api import DecoderOnlyModel, EncoderDecoderModel

V = 96

T5_CASES = {
    # T5 v1.1: gated-GELU, no output rescaling (transformers 5 ties T5's lm_head to `shared` in every case)
    "v1_1_gated_unscaled": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # T5 v1.0 style: ReLU, tied embeddings, odd head count
    "v1_0_tied_odd_heads": dict(d_model=30, d_kv=10, d_ff=40, num_layers=1, num_decoder_layers=2, num_heads=3,
                                feed_forward_proj="relu", tie_word_embeddings=True),
}
LLAMA_CASES = {
    "gqa_untied": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False),
    "odd_heads_tied": dict(hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                           num_key_value_heads=1, tie_word_embeddings=True),
}


def _save_t5(tmp_path, case):
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=V, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                              **T5_CASES[case])
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF's init leaves some tensors tiny; randomise so every weight matters
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  model.save_pretrained(tmp_path)
  return model


def _save_llama(tmp_path, case):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=V, rms_norm_eps=1e-6, **LLAMA_CASES[case])
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(tmp_path)
  return model


def _rows():
  rng = np.random.RandomState(0)
  enc = np.zeros((3, 9), np.int64)
  for b, n in enumerate([9, 5, 2]):  # right-padded, different lengths
    enc[b, :n] = rng.randint(2, V, n)
  tgt = rng.randint(2, V, (3, 5))
  tgt[2, 3:] = 0  # padded target
  return enc, tgt


@pytest.mark.parametrize("case", list(T5_CASES))
def test_t5_parity(tmp_path, case):
  hf = _save_t5(tmp_path / "hf", case)
  config, params = hf_convert.load_hf(tmp_path / "hf", dtype="float32")
  model = EncoderDecoderModel(config)
  enc, tgt = _rows()
  dec_in = np.concatenate([np.zeros((3, 1), np.int64), tgt[:, :-1]], 1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
             decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
  batch = {"encoder_input_tokens": jnp.asarray(enc, jnp.int32), "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32),
           "decoder_target_tokens": jnp.asarray(tgt, jnp.int32),
           "decoder_loss_weights": jnp.asarray(tgt > 0, jnp.int32)}
  ours = np.asarray(model._logits(params, batch, None))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  # per-example losses: HF's mean CE over non-pad labels == our -mean_logprob
  _, mean_lp = model.score_batch(params, batch)
  for b in range(3):
    labels = torch.tensor(np.where(tgt[b:b + 1] > 0, tgt[b:b + 1], -100))
    with torch.no_grad():
      hf_loss = hf(input_ids=torch.tensor(enc[b:b + 1]), attention_mask=torch.tensor(enc[b:b + 1] > 0),
                   decoder_input_ids=torch.tensor(dec_in[b:b + 1]), labels=labels).loss.item()
    np.testing.assert_allclose(-float(mean_lp[b]), hf_loss, rtol=1e-4)
  # incremental decoding with our cache == full forward
  cache, tok = model.decode_init(params, enc.astype(np.int32), 5)
  for s in range(5):
    logits, cache = model.tokens_to_logits(params, cache, tok if s == 0 else jnp.asarray(tgt[:, s - 1], jnp.int32), s)
    np.testing.assert_allclose(np.asarray(logits), ref[:, s], atol=1e-4, rtol=1e-4)
  # export back to HF: same logits
  hf_convert.save_hf(params, config, tmp_path / "export")
  back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
  with torch.no_grad():
    again = back(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in)).logits.numpy()
  np.testing.assert_allclose(again, ref, atol=1e-5)


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_parity(tmp_path, case):
  hf = _save_llama(tmp_path / "hf", case)
  config, params = hf_convert.load_hf(tmp_path / "hf", dtype="float32")
  assert config.num_kv_heads == LLAMA_CASES[case]["num_key_value_heads"]
  model = DecoderOnlyModel(config)
  rng = np.random.RandomState(1)
  ids = rng.randint(1, V, (2, 7))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  batch = {"decoder_input_tokens": jnp.asarray(ids, jnp.int32)}
  np.testing.assert_allclose(np.asarray(model._logits(params, batch, None)), ref, atol=1e-4, rtol=1e-4)
  # per-example loss on the last 3 tokens (prefix-LM weights)
  tgt = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int64)], 1)
  w = np.zeros_like(tgt)
  w[:, 3:6] = 1
  _, mean_lp = model.score_batch(params, dict(batch, decoder_target_tokens=jnp.asarray(tgt, jnp.int32),
                                              decoder_loss_weights=jnp.asarray(w)))
  for b in range(2):
    labels = torch.tensor(np.where(np.arange(7) >= 4, ids[b], -100)[None])  # HF shifts labels internally
    with torch.no_grad():
      hf_loss = hf(input_ids=torch.tensor(ids[b:b + 1]), labels=labels).loss.item()
    np.testing.assert_allclose(-float(mean_lp[b]), hf_loss, rtol=1e-4)
  # incremental decode of right-padded prompts of different lengths == HF full forward on each unpadded row
  prompts = np.zeros((2, 4), np.int32)
  prompts[0, :4] = ids[0, 1:5]
  prompts[1, :2] = ids[1, 1:3]
  cache, tok = model.decode_init(params, prompts, 3)
  cont = rng.randint(2, V, (2, 3)).astype(np.int32)
  for s in range(3):
    logits, cache = model.tokens_to_logits(params, cache, tok if s == 0 else jnp.asarray(cont[:, s - 1]), s)
    for b, n in enumerate([4, 2]):
      seq = np.concatenate([[0], prompts[b, :n], cont[b, :s]])[None]
      with torch.no_grad():
        full = hf(input_ids=torch.tensor(seq, dtype=torch.long)).logits.numpy()[0, -1]
      np.testing.assert_allclose(np.asarray(logits[b]), full, atol=1e-4, rtol=1e-4)
  hf_convert.save_hf(params, config, tmp_path / "export")
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
  with torch.no_grad():
    np.testing.assert_allclose(back(input_ids=torch.tensor(ids)).logits.numpy(), ref, atol=1e-5)


def test_convert_cli_roundtrip(tmp_path, capsys):
  from genret_jax import cli
  hf = _save_llama(tmp_path / "hf", "odd_heads_tied")
  assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"),
                   "--dtype", "float32"]) == 0
  assert (tmp_path / "ours" / "model.gin").exists()
  # Back to HF from the model directory (model.gin found there) and, as before, from its params/ + a gin file.
  assert cli.main(["convert-hf", "--to_hf", "--checkpoint", str(tmp_path / "ours"),
                   "--out", str(tmp_path / "back")]) == 0
  assert cli.main(["convert-hf", "--to_hf", "--gin_file", str(tmp_path / "ours" / "model.gin"),
                   "--checkpoint", str(tmp_path / "ours" / "params"), "--out", str(tmp_path / "back2")]) == 0
  ids = torch.tensor([[3, 4, 5, 6]])
  for d in ("back", "back2"):
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / d).eval()
    with torch.no_grad():
      np.testing.assert_allclose(back(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy(), atol=1e-5)


def test_converted_checkpoint_is_what_training_and_inference_read(tmp_path):
  """convert-hf writes the params format the trainer writes: fine-tuning (`initial_checkpoint_path`), retrieve and
  cgl restore it into the model's mesh shardings, and a trained MODEL_DIR exports back (they were two formats:
  convert-hf wrapped the tree as {"params": tree}, so each cross path failed)."""
  import gin
  from genret_jax import cli
  from genret_jax.gin_utils import parse_gin
  from genret_jax.models import model_api, params_io, partitioning
  from genret_jax.training import trainer
  _save_llama(tmp_path / "hf", "odd_heads_tied")
  assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"),
                   "--dtype", "float32"]) == 0
  gin.clear_config()
  parse_gin([str(tmp_path / "ours" / "model.gin")], [])
  model = model_api.get_model()
  mesh = partitioning.make_mesh(data=2, fsdp=2, model=2)   # conftest: 8 simulated devices
  restored = trainer.load_params(str(tmp_path / "ours"), model, mesh, None)
  _, direct = hf_convert.load_hf(tmp_path / "hf", dtype="float32")
  jax.tree.map(np.testing.assert_array_equal, restored, direct)
  # A trained model's directory (same format, written by params_io) exports with no gin file.
  params_io.save_params(str(tmp_path / "trained"), restored, model_gin=(tmp_path / "ours" / "model.gin").read_text())
  assert cli.main(["convert-hf", "--to_hf", "--checkpoint", str(tmp_path / "trained"),
                   "--out", str(tmp_path / "back")]) == 0
  # An output of the older convert-hf ({"params": tree}) still restores.
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "old" / "params"), {"params": direct})
  jax.tree.map(np.testing.assert_array_equal, params_io.restore_params(str(tmp_path / "old")), direct)
  gin.clear_config()


def test_bad_hf_dir_is_an_input_error(tmp_path):
  with pytest.raises(InputError, match="config.json"):
    hf_convert.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(InputError, match="model_type"):
    hf_convert.load_hf(tmp_path)


def test_bf16_safetensors_read_without_torch(tmp_path, monkeypatch):
  """Hub checkpoints are often bf16: read through safetensors' numpy API (torch is a test-only peer)."""
  import ml_dtypes
  from safetensors.numpy import save_file
  x = np.arange(6, dtype=np.float32).reshape(2, 3) / 8
  save_file({"w": x.astype(ml_dtypes.bfloat16)}, str(tmp_path / "model.safetensors"))
  monkeypatch.setitem(__import__("sys").modules, "torch", None)   # `import torch` now fails
  got = hf_convert.read_hf_weights(tmp_path)
  assert got["w"].dtype == np.float32
  np.testing.assert_array_equal(got["w"], x)


def test_shapes_that_contradict_the_config_are_named(tmp_path):
  """A tensor config.json does not imply was converted and written, failing at the first restore; a model.gin
  whose sizes differ from the saved params failed inside orbax. Both now name the parameter."""
  from safetensors.numpy import load_file, save_file
  from genret_jax.models import model_api, params_io
  _save_llama(tmp_path / "hf", "odd_heads_tied")
  weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
  name = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
  weights[name] = np.zeros((weights[name].shape[0] + 1, weights[name].shape[1]), np.float32)
  save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(InputError, match=r"mlp/wi_1/kernel has shape .* but config.json implies"):
    hf_convert.load_hf(tmp_path / "hf", dtype="float32")
  _save_llama(tmp_path / "hf2", "odd_heads_tied")
  config, params = hf_convert.load_hf(tmp_path / "hf2", dtype="float32")
  params_io.save_params(str(tmp_path / "ours"), params)
  import dataclasses
  bigger = model_api.DecoderOnlyModel(dataclasses.replace(config, vocab_size=config.vocab_size * 2))
  with pytest.raises(InputError, match="shape .* but the model config implies"):
    params_io.restore_params(str(tmp_path / "ours"), params_io.abstract_shapes(bigger))
  (tmp_path / "empty" / "params").mkdir(parents=True)
  with pytest.raises(InputError, match="not an orbax parameter checkpoint"):
    params_io.restore_params(str(tmp_path / "empty"))
