"""Hugging Face <-> genret checkpoints for `T5ForConditionalGeneration` and `LlamaForCausalLM`.

Import: `genret convert-hf --hf_dir DIR --out OUT` reads config.json plus safetensors (single or sharded) or
pytorch_model.bin, and writes `OUT/params` (orbax StandardCheckpointer, the params tree) and `OUT/model.gin`
(the matching size config; `--gin_file OUT/model.gin` then builds the same model).
Export: `genret convert-hf --to_hf --checkpoint MODEL_DIR --out HF_DIR` (model.gin read from MODEL_DIR) writes
config.json + model.safetensors that `from_pretrained` loads.

HF Linear weights are [out, in]; ours are DenseGeneral kernels [in, ..., out], so each matrix is transposed and
the head axes split/merged. HF LLaMA's rotate-half RoPE is implemented as is, so no q/k permutation is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator, NoReturn

import numpy as np

from genret_jax import atomic_files, filesystem
from genret_jax.errors import InputError
from genret_jax.models.llama import LlamaConfig
from genret_jax.models.t5 import T5Config

_ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


# ---- reading HF directories ------------------------------------------------------------------------------------
def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
  if not pathlib.Path(hf_dir).is_dir():
    raise InputError("no such directory (Hugging Face downloads are not fetched: pass a local copy)",
                     path=str(hf_dir))
  path = pathlib.Path(hf_dir) / "config.json"
  if not path.exists():
    raise InputError("no config.json in the Hugging Face directory", path=str(path))
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(f"invalid JSON: {e.msg}", path=str(path), line=e.lineno) from e


@contextlib.contextmanager
def _local_copy(hf_dir: str | os.PathLike) -> Iterator[str]:
  """`hf_dir` itself, or for a URL (gs://) its config, index and weight files copied to a local temporary directory:
  safetensors and torch read local files. Errors about those files name the URL."""
  if not filesystem.is_remote(hf_dir):
    yield os.fspath(hf_dir)
    return
  url = filesystem.abspath(hf_dir)
  if not filesystem.isdir(url):
    raise InputError("no such directory", path=url)
  with tempfile.TemporaryDirectory(prefix="genret-hf-") as tmp:
    for name in filesystem.listdir(url):
      if name.endswith((".json", ".safetensors", ".bin")):
        with filesystem.open(os.path.join(url, name), "rb") as src, open(os.path.join(tmp, name), "wb") as dst:
          shutil.copyfileobj(src, dst, 16 << 20)
    try:
      yield tmp
    except InputError as e:
      if e.path is None or not e.path.startswith(tmp):
        raise
      raise InputError(e.message, path=url + e.path[len(tmp):], line=e.line, key=e.key) from None


def read_hf_weights(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as float32 numpy arrays."""
  return _read_hf_weights(hf_dir)[0]


def _read_hf_weights(hf_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors as float32 numpy arrays, the file each tensor was read from)."""
  d = pathlib.Path(hf_dir)
  files = sorted(d.glob("*.safetensors"))
  sources: dict[str, str] = {}
  if files:
    from safetensors import SafetensorError, safe_open
    out = {}
    for f in files:
      try:
        with safe_open(str(f), framework="np") as fh:  # bf16 arrives as ml_dtypes.bfloat16: no torch needed
          for k in fh.keys():
            out[k] = fh.get_tensor(k).astype(np.float32)
            sources[k] = str(f)
      except SafetensorError as e:
        raise InputError(f"not a readable safetensors file: {e}", path=str(f)) from e
    return out, sources
  bins = sorted(d.glob("pytorch_model*.bin"))
  if bins:
    try:
      import torch   # pickled PyTorch checkpoints need it; safetensors ones do not
    except ImportError as e:
      raise InputError("pytorch_model*.bin weights need torch (pip install -e .[test]); safetensors "
                       "checkpoints do not", path=str(d)) from e
    out = {}
    for f in bins:
      for k, v in torch.load(str(f), map_location="cpu", weights_only=True).items():
        out[k] = v.float().numpy()
        sources[k] = str(f)
    return out, sources
  raise InputError("no *.safetensors or pytorch_model*.bin weights found", path=str(d))


def _get(cfg: dict, *keys, default=None):
  for k in keys:
    if cfg.get(k) is not None:
      return cfg[k]
  return default


# Every config.json field that changes what transformers computes is either mapped below or refused with an
# InputError naming config.json and the key: a field we skipped would convert into a different model without a
# word. Fields with no effect on the computation (initializer_*, use_cache, token ids other than T5's decoder start,
# max_position_embeddings under default RoPE, pretraining_tp: transformers 5 ignores it and 4.x only split the same
# matmuls) are not read. docs/models.md lists what is supported and what is refused.
def _refuse(path: str, key: str, why: str) -> NoReturn:
  raise InputError(f"{key}: {why}", path=path, key=key)


def _required(hf: dict, key: str, path: str):
  if hf.get(key) is None:
    _refuse(path, key, "missing (the model's size needs it)")
  return hf[key]


def t5_config_from_hf(hf: dict[str, Any], config_path: str | os.PathLike = "config.json", **overrides) -> T5Config:
  path = str(config_path)
  proj = _get(hf, "feed_forward_proj", default="relu")
  parts = str(proj).split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    _refuse(path, "feed_forward_proj", f"{proj!r} is neither 'ACT' nor 'gated-ACT' (transformers refuses it too)")
  gated = len(parts) == 2
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]
  # transformers derives dense_act_fn / is_gated_act from feed_forward_proj, then config.json's own copies (every
  # saved config has them) override it: a hand-edited feed_forward_proj would not change HF's model, nor, mapped
  # from feed_forward_proj, would ours match it.
  for key, implied in (("dense_act_fn", act), ("is_gated_act", gated)):
    if hf.get(key) is not None and hf[key] != implied:
      _refuse(path, key, f"{hf[key]!r} contradicts feed_forward_proj {proj!r} (which implies {implied!r}); "
              "transformers would use the former: make them agree")
  if act not in _ACT_FROM_HF:
    _refuse(path, "feed_forward_proj", f"activation {act!r} of {proj!r} is not supported (one of "
            f"{', '.join(sorted(_ACT_FROM_HF))}, optionally gated-)")
  acts = (_ACT_FROM_HF[act], "linear") if gated else (_ACT_FROM_HF[act],)
  start = hf.get("decoder_start_token_id")
  if start not in (None, 0):
    _refuse(path, "decoder_start_token_id", f"{start!r}: our T5 decoder (and its feature converter) starts from "
            "token 0")
  # transformers >= 5 always ties T5's lm_head and keeps v1.0's output rescaling as scale_decoder_outputs, whose
  # presence wins (null included: no rescaling); older configs only say tie_word_embeddings (absent = tied).
  tied = hf.get("tie_word_embeddings") is not False
  scale = bool(hf["scale_decoder_outputs"]) if "scale_decoder_outputs" in hf else tied
  if hf.get("model_type") == "mt5":
    # transformers 4 rescaled a tied mT5's decoder output, 5 never does (nor reads scale_decoder_outputs): which
    # one trained it is not recorded. google/mt5-* are untied, where both agree.
    if tied:
      _refuse(path, "tie_word_embeddings", "a tied mT5 is computed differently by transformers 4 (output x "
              "d_model**-0.5) and 5 (not rescaled); only untied mT5 (tie_word_embeddings false) is imported")
    scale = False
  return T5Config(
      vocab_size=_required(hf, "vocab_size", path), d_model=_required(hf, "d_model", path),
      num_heads=_required(hf, "num_heads", path), head_dim=_required(hf, "d_kv", path),
      d_ff=_required(hf, "d_ff", path), num_encoder_layers=_required(hf, "num_layers", path),
      num_decoder_layers=_get(hf, "num_decoder_layers", "num_layers"), mlp_activations=acts,
      relative_attention_num_buckets=_get(hf, "relative_attention_num_buckets", default=32),
      relative_attention_max_distance=_get(hf, "relative_attention_max_distance", default=128),
      dropout_rate=_get(hf, "dropout_rate", default=0.1),   # transformers' default
      layer_norm_epsilon=_get(hf, "layer_norm_epsilon", default=1e-6), tie_word_embeddings=tied,
      scale_decoder_outputs=scale, **overrides)


_PARTIAL_ROPE = ("our RoPE, like transformers' LLaMA (which ignores the factor), rotates every dimension, not what "
                 "a model trained with a partial rotation expects")


def llama_config_from_hf(hf: dict[str, Any], config_path: str | os.PathLike = "config.json",
                         **overrides) -> LlamaConfig:
  path = str(config_path)
  # Both RoPE dicts are checked: transformers reads the legacy rope_scaling first, a 5.x config rope_parameters.
  for key in ("rope_scaling", "rope_parameters"):
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
      _refuse(path, key, f"{rope!r} is not a JSON object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      _refuse(path, key, f"rope_type {rope_type!r} is not supported (only default RoPE: llama3, linear, dynamic, "
              "yarn, longrope rescale its frequencies)")
    if _get(rope, "partial_rotary_factor", default=1.0) != 1.0:
      _refuse(path, key, f"partial_rotary_factor {rope['partial_rotary_factor']!r}: {_PARTIAL_ROPE}")
  if _get(hf, "partial_rotary_factor", default=1.0) != 1.0:
    _refuse(path, "partial_rotary_factor", f"{hf['partial_rotary_factor']!r}: {_PARTIAL_ROPE}")
  # transformers' order: the legacy dict, then 5.x's rope_parameters, then the top-level field.
  theta = next((d["rope_theta"] for d in (hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}, hf)
                if d.get("rope_theta") is not None), 10000.0)
  act = _get(hf, "hidden_act", default="silu")
  if act not in ("silu", "swish"):
    _refuse(path, "hidden_act", f"{act!r} is not supported (SwiGLU uses silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      _refuse(path, key, f"{hf[key]!r}: biases are not supported")
  if _get(hf, "attention_dropout", default=0.0) != 0.0:
    _refuse(path, "attention_dropout", f"{hf['attention_dropout']!r}: our LLaMA has no attention-only dropout "
            "(its dropout_rate also drops the residual and MLP outputs); set it to 0.0 to import")
  heads = _required(hf, "num_attention_heads", path)
  d_model = _required(hf, "hidden_size", path)
  return LlamaConfig(
      vocab_size=_required(hf, "vocab_size", path), d_model=d_model,
      num_layers=_required(hf, "num_hidden_layers", path), num_heads=heads,
      num_kv_heads=_get(hf, "num_key_value_heads", default=heads),
      head_dim=_get(hf, "head_dim", default=d_model // heads), d_ff=_required(hf, "intermediate_size", path),
      rope_theta=float(theta),
      rms_norm_eps=_get(hf, "rms_norm_eps", default=1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings")),
      **overrides)


def config_from_hf(hf: dict[str, Any], config_path: str | os.PathLike = "config.json", **overrides):
  model_type = hf.get("model_type", "")
  if model_type in ("t5", "mt5"):
    return t5_config_from_hf(hf, config_path, **overrides)
  if model_type == "llama":
    return llama_config_from_hf(hf, config_path, **overrides)
  _refuse(str(config_path), "model_type",
          f"{model_type!r} is not supported (T5ForConditionalGeneration or LlamaForCausalLM)")


# ---- weight mapping ---------------------------------------------------------------------------------------------
def _q_in(w, heads, hd):  # HF [heads*hd, d] -> ours [d, heads, hd]
  return w.T.reshape(w.shape[1], heads, hd)


def _o_in(w, heads, hd):  # HF [d, heads*hd] -> ours [heads, hd, d]
  return w.T.reshape(heads, hd, w.shape[0])


def _q_out(k):
  return k.reshape(k.shape[0], -1).T


def _o_out(k):
  return k.reshape(-1, k.shape[-1]).T


def _attn_in(sd, prefix, names, heads, kv_heads, hd):
  q, k, v, o = (sd[f"{prefix}.{n}.weight"] for n in names)
  return {"query": {"kernel": _q_in(q, heads, hd)}, "key": {"kernel": _q_in(k, kv_heads, hd)},
          "value": {"kernel": _q_in(v, kv_heads, hd)}, "out": {"kernel": _o_in(o, heads, hd)}}


def _attn_out(p, prefix, names):
  return {f"{prefix}.{names[0]}.weight": _q_out(p["query"]["kernel"]),
          f"{prefix}.{names[1]}.weight": _q_out(p["key"]["kernel"]),
          f"{prefix}.{names[2]}.weight": _q_out(p["value"]["kernel"]),
          f"{prefix}.{names[3]}.weight": _o_out(p["out"]["kernel"])}


def _mlp_names(config: T5Config) -> list[str]:
  return ["wi"] if len(config.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(config.mlp_activations))]


def _need(sd: dict, key: str):
  if key not in sd:
    raise InputError(f"weight {key!r} missing from the checkpoint", key=key)
  return sd[key]


def t5_params_from_hf(sd: dict[str, np.ndarray], c: T5Config) -> dict:
  qkvo = ("q", "k", "v", "o")
  h, hd = c.num_heads, c.head_dim
  _need(sd, "shared.weight")
  enc: dict[str, Any] = {
      "relpos_bias": {"rel_embedding": _need(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")},
      "encoder_norm": {"scale": sd["encoder.final_layer_norm.weight"]}}
  for i in range(c.num_encoder_layers):
    b = f"encoder.block.{i}.layer"
    enc[f"layers_{i}"] = {
        "pre_attention_layer_norm": {"scale": sd[f"{b}.0.layer_norm.weight"]},
        "attention": _attn_in(sd, f"{b}.0.SelfAttention", qkvo, h, h, hd),
        "pre_mlp_layer_norm": {"scale": sd[f"{b}.1.layer_norm.weight"]},
        "mlp": {**{n: {"kernel": sd[f"{b}.1.DenseReluDense.{n}.weight"].T} for n in _mlp_names(c)},
                "wo": {"kernel": sd[f"{b}.1.DenseReluDense.wo.weight"].T}}}
  dec: dict[str, Any] = {
      "relpos_bias": {"rel_embedding": _need(sd, "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")},
      "decoder_norm": {"scale": sd["decoder.final_layer_norm.weight"]}}
  for i in range(c.num_decoder_layers):
    b = f"decoder.block.{i}.layer"
    dec[f"layers_{i}"] = {
        "pre_self_attention_layer_norm": {"scale": sd[f"{b}.0.layer_norm.weight"]},
        "self_attention": _attn_in(sd, f"{b}.0.SelfAttention", qkvo, h, h, hd),
        "pre_cross_attention_layer_norm": {"scale": sd[f"{b}.1.layer_norm.weight"]},
        "encoder_decoder_attention": _attn_in(sd, f"{b}.1.EncDecAttention", qkvo, h, h, hd),
        "pre_mlp_layer_norm": {"scale": sd[f"{b}.2.layer_norm.weight"]},
        "mlp": {**{n: {"kernel": sd[f"{b}.2.DenseReluDense.{n}.weight"].T} for n in _mlp_names(c)},
                "wo": {"kernel": sd[f"{b}.2.DenseReluDense.wo.weight"].T}}}
  if not c.tie_word_embeddings:
    dec["logits_dense"] = {"kernel": _need(sd, "lm_head.weight").T}
  return {"token_embedder": {"embedding": sd["shared.weight"]}, "encoder": enc, "decoder": dec}


def t5_params_to_hf(p: dict, c: T5Config) -> dict[str, np.ndarray]:
  qkvo = ("q", "k", "v", "o")
  sd = {"shared.weight": p["token_embedder"]["embedding"]}
  enc, dec = p["encoder"], p["decoder"]
  sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = enc["relpos_bias"]["rel_embedding"]
  sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = dec["relpos_bias"]["rel_embedding"]
  sd["encoder.final_layer_norm.weight"] = enc["encoder_norm"]["scale"]
  sd["decoder.final_layer_norm.weight"] = dec["decoder_norm"]["scale"]
  for i in range(c.num_encoder_layers):
    b, lp = f"encoder.block.{i}.layer", enc[f"layers_{i}"]
    sd[f"{b}.0.layer_norm.weight"] = lp["pre_attention_layer_norm"]["scale"]
    sd.update(_attn_out(lp["attention"], f"{b}.0.SelfAttention", qkvo))
    sd[f"{b}.1.layer_norm.weight"] = lp["pre_mlp_layer_norm"]["scale"]
    for n in _mlp_names(c) + ["wo"]:
      sd[f"{b}.1.DenseReluDense.{n}.weight"] = lp["mlp"][n]["kernel"].T
  for i in range(c.num_decoder_layers):
    b, lp = f"decoder.block.{i}.layer", dec[f"layers_{i}"]
    sd[f"{b}.0.layer_norm.weight"] = lp["pre_self_attention_layer_norm"]["scale"]
    sd.update(_attn_out(lp["self_attention"], f"{b}.0.SelfAttention", qkvo))
    sd[f"{b}.1.layer_norm.weight"] = lp["pre_cross_attention_layer_norm"]["scale"]
    sd.update(_attn_out(lp["encoder_decoder_attention"], f"{b}.1.EncDecAttention", qkvo))
    sd[f"{b}.2.layer_norm.weight"] = lp["pre_mlp_layer_norm"]["scale"]
    for n in _mlp_names(c) + ["wo"]:
      sd[f"{b}.2.DenseReluDense.{n}.weight"] = lp["mlp"][n]["kernel"].T
  sd["lm_head.weight"] = (p["token_embedder"]["embedding"] if c.tie_word_embeddings
                          else dec["logits_dense"]["kernel"].T)
  return sd


_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_params_from_hf(sd: dict[str, np.ndarray], c: LlamaConfig) -> dict:
  p: dict[str, Any] = {"token_embedder": {"embedding": _need(sd, "model.embed_tokens.weight")},
                       "final_norm": {"scale": _need(sd, "model.norm.weight")}}
  for i in range(c.num_layers):
    b = f"model.layers.{i}"
    _need(sd, f"{b}.self_attn.q_proj.weight")
    p[f"layers_{i}"] = {
        "attention_norm": {"scale": sd[f"{b}.input_layernorm.weight"]},
        "attention": _attn_in(sd, f"{b}.self_attn", _LLAMA_ATTN, c.num_heads, c.num_kv_heads, c.head_dim),
        "mlp_norm": {"scale": sd[f"{b}.post_attention_layernorm.weight"]},
        "mlp": {"wi_0": {"kernel": sd[f"{b}.mlp.gate_proj.weight"].T},
                "wi_1": {"kernel": sd[f"{b}.mlp.up_proj.weight"].T},
                "wo": {"kernel": sd[f"{b}.mlp.down_proj.weight"].T}}}
  if not c.tie_word_embeddings:
    p["logits_dense"] = {"kernel": _need(sd, "lm_head.weight").T}
  return p


def llama_params_to_hf(p: dict, c: LlamaConfig) -> dict[str, np.ndarray]:
  sd = {"model.embed_tokens.weight": p["token_embedder"]["embedding"], "model.norm.weight": p["final_norm"]["scale"]}
  for i in range(c.num_layers):
    b, lp = f"model.layers.{i}", p[f"layers_{i}"]
    sd[f"{b}.input_layernorm.weight"] = lp["attention_norm"]["scale"]
    sd.update(_attn_out(lp["attention"], f"{b}.self_attn", _LLAMA_ATTN))
    sd[f"{b}.post_attention_layernorm.weight"] = lp["mlp_norm"]["scale"]
    sd[f"{b}.mlp.gate_proj.weight"] = lp["mlp"]["wi_0"]["kernel"].T
    sd[f"{b}.mlp.up_proj.weight"] = lp["mlp"]["wi_1"]["kernel"].T
    sd[f"{b}.mlp.down_proj.weight"] = lp["mlp"]["wo"]["kernel"].T
  if not c.tie_word_embeddings:
    sd["lm_head.weight"] = p["logits_dense"]["kernel"].T
  return sd


def hf_config_from(config) -> dict[str, Any]:
  """config.json content for our config."""
  if isinstance(config, T5Config):
    acts = config.mlp_activations
    if len(acts) == 2 and acts[1] == "linear":
      proj = "gated-gelu" if acts[0] == "gelu" else f"gated-{_ACT_TO_HF[acts[0]]}"
    elif len(acts) == 1:
      proj = _ACT_TO_HF[acts[0]]
    else:
      raise InputError(f"mlp_activations {acts} have no Hugging Face equivalent", key="mlp_activations")
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
            "d_model": config.d_model, "d_kv": config.head_dim, "d_ff": config.d_ff,
            "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
            "num_heads": config.num_heads, "relative_attention_num_buckets": config.relative_attention_num_buckets,
            "relative_attention_max_distance": config.relative_attention_max_distance,
            "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
            "feed_forward_proj": proj, "tie_word_embeddings": config.tie_word_embeddings,
            "scale_decoder_outputs": bool(config.tie_word_embeddings if config.scale_decoder_outputs is None
                                          else config.scale_decoder_outputs),
            "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
          "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "intermediate_size": config.d_ff, "rms_norm_eps": config.rms_norm_eps,
          "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
          "hidden_act": "silu", "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False,
          "mlp_bias": False, "max_position_embeddings": 4096}


class _ReadTracker(dict):
  """A state dict that records which tensors the converter read, and names a missing one (a config.json with
  more layers than the weights hold was a KeyError traceback)."""

  def __init__(self, sd: dict, hf_dir: str):
    super().__init__(sd)
    self.read: set[str] = set()
    self.hf_dir = hf_dir

  def __getitem__(self, key):
    if key not in self:
      raise InputError(f"weight {key!r} missing from the checkpoint (config.json implies it)", path=self.hf_dir)
    self.read.add(key)
    return super().__getitem__(key)


def _ignorable(name: str, sd: dict[str, np.ndarray], config) -> bool:
  """Tensors HF writes that the converted model knowingly does without: the per-stack copies of T5's tied
  `shared` embedding, a tied output head identical to the embedding, and the rotary `inv_freq` buffers older
  LLaMA checkpoints store (recomputed from rope_theta)."""
  if isinstance(config, T5Config):
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      return True   # HF ties both to `shared` whatever they hold
    embed = "shared.weight"
  else:
    if name.endswith(".rotary_emb.inv_freq"):
      return True
    embed = "model.embed_tokens.weight"
  return (name == "lm_head.weight" and config.tie_word_embeddings and embed in sd
          and sd[name].shape == sd[embed].shape and np.array_equal(sd[name], sd[embed]))


def check_all_tensors_used(sd: dict[str, np.ndarray], read: set[str], config, sources: dict[str, str],
                           hf_dir: str) -> None:
  """Every tensor of the checkpoint is converted or knowingly ignored (`_ignorable`); any other one means
  config.json does not describe the checkpoint (e.g. fewer layers than the weights hold), which would otherwise
  convert a truncated model without a word."""
  unused = [k for k in sd if k not in read and not _ignorable(k, sd, config)]
  if not unused:
    return
  files = sorted({sources.get(k, str(hf_dir)) for k in unused})
  shown = ", ".join(unused[:6]) + (", ..." if len(unused) > 6 else "")
  layers = "num_layers / num_decoder_layers" if isinstance(config, T5Config) else "num_hidden_layers"
  extra = f" (and in {len(files) - 1} other file(s))" if len(files) > 1 else ""
  raise InputError(f"{len(unused)} tensor(s){extra} that config.json does not account for would be dropped: "
                   f"{shown}; does config.json ({layers}, ...) describe this checkpoint?", path=files[0])


def params_from_hf(sd: dict[str, np.ndarray], config) -> dict:
  from genret_jax.models import layers
  p = t5_params_from_hf(sd, config) if isinstance(config, T5Config) else llama_params_from_hf(sd, config)
  p = _to_float32(p)
  return layers.stack_layer_params(p) if config.scan_layers else p


def params_to_hf(params: dict, config) -> dict[str, np.ndarray]:
  from genret_jax.models import layers
  p = layers.unstack_layer_params(_to_float32(params)) if config.scan_layers else _to_float32(params)
  sd = t5_params_to_hf(p, config) if isinstance(config, T5Config) else llama_params_to_hf(p, config)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _to_float32(tree):
  import jax
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def load_hf(hf_dir: str | os.PathLike, **config_overrides) -> tuple[Any, dict]:
  """(our config, our params) from a HF checkpoint directory."""
  config = config_from_hf(read_hf_config(hf_dir), pathlib.Path(hf_dir) / "config.json", **config_overrides)
  sd, sources = _read_hf_weights(hf_dir)
  if isinstance(config, T5Config) and config.tie_word_embeddings and "lm_head.weight" in sd and not np.array_equal(
      sd["lm_head.weight"], sd.get("shared.weight")):
    config = dataclasses.replace(config, tie_word_embeddings=False)  # an untied lm_head is stored: keep it
  tracked = _ReadTracker(sd, str(hf_dir))
  params = params_from_hf(tracked, config)
  check_all_tensors_used(sd, tracked.read, config, sources, str(hf_dir))
  from genret_jax.models import model_api, params_io
  model = (model_api.EncoderDecoderModel if isinstance(config, T5Config) else model_api.DecoderOnlyModel)(config)
  # A tensor whose shape config.json does not imply would otherwise be written and fail at the first restore.
  params_io.check_shapes(params, params_io.abstract_shapes(model), str(hf_dir), "config.json")
  return config, params


def save_hf(params: dict, config, out_dir: str | os.PathLike) -> None:
  """config.json + model.safetensors loadable by `AutoModel*.from_pretrained(out_dir)`; `out_dir` may be a URL
  (gs://: a pod's model exported next to it), each file written whole (`atomic_files`)."""
  from safetensors.numpy import save_file
  out = filesystem.abspath(out_dir)
  filesystem.makedirs(out)
  sd = params_to_hf(params, config)
  if config.tie_word_embeddings and isinstance(config, LlamaConfig):
    sd.pop("lm_head.weight", None)
  atomic_files.write_text(os.path.join(out, "config.json"), json.dumps(hf_config_from(config), indent=2))
  atomic_files.write_with(os.path.join(out, "model.safetensors"),
                          lambda path: save_file(sd, path, metadata={"format": "pt"}))


# ---- gin + orbax -----------------------------------------------------------------------------------------------
def gin_for_config(config) -> str:
  """A size gin equivalent to `config` (same layout as gin_configs/models/*)."""
  is_t5 = isinstance(config, T5Config)
  cls, wrapper = ("T5Config", "EncoderDecoderModel") if is_t5 else ("LlamaConfig", "DecoderOnlyModel")
  lines = [f"# Converted from Hugging Face ({config.family}).", "import genret_jax.models", "",
           f"MODEL = @models.{wrapper}()", "models.get_model.model = %MODEL",
           f"models.{wrapper}.config = @models.{cls}()"]
  for f in dataclasses.fields(config):
    lines.append(f"models.{cls}.{f.name} = {getattr(config, f.name)!r}")
  return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--hf_dir", help="Hugging Face checkpoint directory (import), or output dir with --to_hf.")
  parser.add_argument("--out", required=True, help="Output directory.")
  parser.add_argument("--to_hf", action="store_true", help="Export a genret checkpoint to Hugging Face format.")
  parser.add_argument("--checkpoint", help="With --to_hf: a model directory (a finished `genret train` MODEL_DIR "
                      "or a convert-hf output: params/ + model.gin) or its params/ directory.")
  parser.add_argument("--scan_layers", action="store_true", help="Import into the scan-over-layers layout.")
  parser.add_argument("--dtype", default="bfloat16", help="Compute dtype written to the gin config.")
  from genret_jax.gin_utils import add_gin_arguments
  add_gin_arguments(parser)


def run(args: argparse.Namespace) -> int:
  from genret_jax.models import params_io
  if args.to_hf:
    from genret_jax.gin_utils import parse_gin
    from genret_jax.models.model_api import get_model
    if not args.checkpoint:
      raise InputError("--to_hf needs --checkpoint (a model directory)", key="--checkpoint")
    model_dir = filesystem.abspath(args.checkpoint)   # may be gs://: read through tf.io.gfile and orbax
    if os.path.basename(model_dir) == params_io.PARAMS_SUBDIR and not params_io.has_params(model_dir):
      model_dir = os.path.dirname(model_dir)
    gin_files = args.gin_file
    if not gin_files:
      gin_files = [os.path.join(model_dir, params_io.MODEL_GIN)]
      if not filesystem.isfile(gin_files[0]):
        raise InputError(f"no {params_io.MODEL_GIN} next to the params; pass the model's --gin_file",
                         path=model_dir)
    parse_gin(gin_files, args.gin_bindings, args.gin_search_paths)
    config = get_model().config
    save_hf(params_io.restore_params(model_dir), config, args.out)
    print(f"wrote {args.out}/config.json and model.safetensors ({config.family})")
    return 0
  if not args.hf_dir:
    raise InputError("--hf_dir is required (or --to_hf)", key="--hf_dir")
  with _local_copy(args.hf_dir) as hf_dir:
    config, params = load_hf(hf_dir, dtype=args.dtype, scan_layers=args.scan_layers)
  # The one params format (params_io): `genret train --gin.INITIAL_CHECKPOINT_PATH`, retrieve and cgl read it.
  params_io.save_params(args.out, params, model_gin=gin_for_config(config))
  print(f"wrote {args.out}/params (orbax) and {args.out}/model.gin ({config.family})")
  return 0
