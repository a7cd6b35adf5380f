"""Parameter counts and FLOPs per token, computed from a model config without allocating anything.

Parameters are counted the way the paper (and Kaplan et al.) counts them: `total` is every parameter once (a tied
embedding counts once), `non_embedding = total - vocab_size * d_model` (exactly one vocab x d_model matrix is
removed, so an untied output projection stays in N). Example: t5-small 60,506,624 -> 44,057,088;
Llama-2-7B 6,738,415,616 -> 6,607,343,616.

FLOPs (multiply-add = 2 FLOPs), per token, broken down so nothing is hidden:
* `dense`: 2 x (non-embedding matmul parameters touched by the token), i.e. the 2N of Kaplan et al. minus the
  output projection and the (free) norm scales / relative-position tables;
* `attention`: 2 x 2 x n_layers x context x (heads x head_dim) for the QK^T logits and the AV reduction, with
  `context` the number of keys each query attends to (causal self-attention averages (L + 1) / 2 keys);
* `embedding`: 2 x vocab x d_model for the output logits (the input lookup is a gather, 0 FLOPs).
Training = 3 x forward (backward = 2 x forward). Decode step with a KV cache: one new token against `context`
cached keys; for T5 the cross-attention keys/values are projected once at `decode_init` (reported separately).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from genret_jax.models.llama import LlamaConfig
from genret_jax.models.t5 import T5Config


# Bumped whenever a FLOP formula changes, so stored results can say which count they used (sweep cells record
# it). 1: until session 10 (T5 decode steps without 4 of 6 attention projections, T5 cross-attention K/V per
# target token, LLaMA prefill with logits). 2: the formulas tested against XLA's cost analysis.
FLOPS_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  non_embedding: int
  embedding: int  # the one vocab x d_model matrix excluded from non_embedding


@dataclasses.dataclass(frozen=True)
class Flops:
  dense: float
  attention: float
  embedding: float

  @property
  def total(self) -> float:
    return self.dense + self.attention + self.embedding

  def scaled(self, factor: float) -> "Flops":
    return Flops(self.dense * factor, self.attention * factor, self.embedding * factor)

  def as_dict(self) -> dict[str, float]:
    return {"dense": self.dense, "attention": self.attention, "embedding": self.embedding, "total": self.total}


def param_shapes(config: Any) -> Any:
  """Abstract (ShapeDtypeStruct) unboxed params of a config, via jax.eval_shape: no allocation."""
  from genret_jax.models.model_api import model_for_config  # late import: model_api imports the families
  model = model_for_config(config)
  return jax.eval_shape(lambda r: model.init(r), jax.random.key(0))


def count_params(config: Any) -> ParamCounts:
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(config)))
  emb = config.vocab_size * config.d_model
  return ParamCounts(total=total, non_embedding=total - emb, embedding=emb)


def _attn_dim(config: Any) -> int:
  return config.num_heads * config.head_dim


def _llama_layer_matmul_params(c: LlamaConfig) -> int:
  return c.d_model * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.d_model * c.d_ff


def _t5_mlp_params(c: T5Config) -> int:
  return (len(c.mlp_activations) + 1) * c.d_model * c.d_ff


def forward_flops_per_token(config: Any, context: float) -> Flops:
  """Forward FLOPs per token (decoder-only: attending to `context` keys on average)."""
  if isinstance(config, LlamaConfig):
    dense = 2.0 * config.num_layers * _llama_layer_matmul_params(config)
    attention = 4.0 * config.num_layers * context * _attn_dim(config)
    return Flops(dense, attention, 2.0 * config.vocab_size * config.d_model)
  raise TypeError("forward_flops_per_token is for decoder-only configs; use forward_flops_per_example for T5")


def forward_flops_per_example(config: Any, inputs_length: int, targets_length: int) -> Flops:
  """Forward FLOPs of one example (full causal attention accounted exactly, no packing)."""
  if isinstance(config, LlamaConfig):
    length = inputs_length + targets_length
    per_token = forward_flops_per_token(config, (length + 1) / 2.0)
    return per_token.scaled(length)
  if isinstance(config, T5Config):
    a = _attn_dim(config)
    enc_layer = 4 * config.d_model * a + _t5_mlp_params(config)
    # Per target token: Q, K, V, out of the self-attention and Q, out of the cross-attention; the cross-attention
    # K/V project the encoder output, once per input token.
    dec_layer = 6 * config.d_model * a + _t5_mlp_params(config)
    dense = (2.0 * config.num_encoder_layers * enc_layer * inputs_length
             + 2.0 * config.num_decoder_layers * dec_layer * targets_length
             + 2.0 * config.num_decoder_layers * 2 * config.d_model * a * inputs_length)
    attention = (4.0 * config.num_encoder_layers * inputs_length * inputs_length * a
                 + 4.0 * config.num_decoder_layers * targets_length * ((targets_length + 1) / 2.0) * a
                 + 4.0 * config.num_decoder_layers * targets_length * inputs_length * a)
    embedding = 2.0 * config.vocab_size * config.d_model * targets_length
    return Flops(dense, attention, embedding)
  raise TypeError(f"unknown config {type(config).__name__}")


def train_flops_per_example(config: Any, inputs_length: int, targets_length: int) -> Flops:
  """Forward + backward = 3 x forward (the 6N rule plus the attention and logits terms)."""
  return forward_flops_per_example(config, inputs_length, targets_length).scaled(3.0)


def train_flops_per_token(config: Any, inputs_length: int, targets_length: int) -> Flops:
  """Training FLOPs per processed token (input + target tokens)."""
  return train_flops_per_example(config, inputs_length, targets_length).scaled(
      1.0 / (inputs_length + targets_length))


def decode_step_flops(config: Any, context: int, inputs_length: int = 0) -> Flops:
  """FLOPs for one new token per sequence (per beam) given `context` cached keys (including the new one)."""
  if isinstance(config, LlamaConfig):
    return forward_flops_per_token(config, context)
  if isinstance(config, T5Config):
    a = _attn_dim(config)
    # Per layer the new token goes through six d_model x (heads x head_dim) projections: Q, K, V and out of the
    # self-attention, Q and out of the cross-attention (whose K/V of the encoder output are projected once per
    # example, in decode_init_flops).
    dense = 2.0 * config.num_decoder_layers * (6 * config.d_model * a + _t5_mlp_params(config))
    attention = 4.0 * config.num_decoder_layers * (context + inputs_length) * a
    return Flops(dense, attention, 2.0 * config.vocab_size * config.d_model)
  raise TypeError(f"unknown config {type(config).__name__}")


def decode_init_flops(config: Any, inputs_length: int) -> Flops:
  """One-off FLOPs per example before decoding: T5 encoder + cross K/V projections; LLaMA prompt prefill."""
  if isinstance(config, LlamaConfig):
    # The prefill keeps only K/V: no logits, and the last layer's queries, attention and MLP feed nothing kept (the
    # last prompt token goes through the model at the first decode step), so they are not computed.
    full = forward_flops_per_example(config, inputs_length, 0)
    last_layer_kv = config.d_model * config.head_dim * 2 * config.num_kv_heads
    skipped = 2.0 * (_llama_layer_matmul_params(config) - last_layer_kv) * inputs_length
    return Flops(full.dense - skipped, full.attention * (config.num_layers - 1) / config.num_layers, 0.0)
  if isinstance(config, T5Config):
    enc = forward_flops_per_example(config, inputs_length, 0)   # includes the cross K/V of the encoded inputs
    return Flops(enc.dense, enc.attention, 0.0)
  raise TypeError(f"unknown config {type(config).__name__}")


def summary(config: Any, inputs_length: int = 64, targets_length: int = 16) -> dict[str, Any]:
  """Everything `genret model-info` prints, as plain numbers."""
  counts = count_params(config)
  train = train_flops_per_token(config, inputs_length, targets_length)
  return {
      "family": config.family,
      "params_total": counts.total,
      "params_non_embedding": counts.non_embedding,
      "params_embedding_matrix": counts.embedding,
      "inputs_length": inputs_length,
      "targets_length": targets_length,
      "forward_flops_per_example": forward_flops_per_example(config, inputs_length, targets_length).as_dict(),
      "train_flops_per_token": train.as_dict(),
      "six_n_per_token": 6.0 * counts.non_embedding,
      "decode_init_flops_per_example": decode_init_flops(config, inputs_length).as_dict(),
      "decode_step_flops_per_beam": decode_step_flops(
          config, (inputs_length + 1 if config.family == "llama" else 0) + targets_length,
          inputs_length if config.family == "t5" else 0).as_dict(),
  }


def _log10(x: float) -> float:
  return math.log10(max(x, 1.0))
