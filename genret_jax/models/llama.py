"""LLaMA-like decoder-only transformer in Flax Linen (one file, read top to bottom).

RMSNorm, rotary position embeddings ("rotate half", as HF), SwiGLU feed-forward, grouped-query attention
(num_kv_heads divides num_heads), no biases, optional tied input/output embeddings. Used as a prefix-LM for
query -> identifier (the loss masking lives in `model_api.DecoderOnlyModel`).

Parameter layout (unscanned; with `scan_layers` the `layers_{i}` become one `layers` stack with a leading axis):
  token_embedder/embedding                        [vocab, embed]
  layers_{i}/attention_norm/scale, layers_{i}/attention/{query,key,value,out}/kernel
  layers_{i}/mlp_norm/scale, layers_{i}/mlp/{wi_0 (gate), wi_1 (up), wo (down)}/kernel
  final_norm/scale, logits_dense/kernel [embed, vocab] (untied only)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from genret_jax.errors import InputError
from genret_jax.models import layers as L

Array = jax.Array


@gin.configurable(module="models")
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA hyper-parameters (defaults: Llama-2-7B). `head_dim=0` means d_model // num_heads."""
  vocab_size: int = 32000
  d_model: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0
  d_ff: int = 11008
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  dropout_rate: float = 0.0
  # None: 1.0 untied; d_model**-0.5 tied, because tied logits are h . E unscaled (as Hugging Face computes them)
  # and a unit-std table would start them at std sqrt(d_model) -- an initial loss several times log(vocab).
  embedding_init_std: float | None = None
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = False
  # Tokens per vocabulary-projection chunk when only per-token statistics are needed (loss, scoring):
  # `layers.projected_token_stats`. 0: one projection of every position.
  logits_chunk_tokens: int = 1024

  family = "llama"

  def __post_init__(self):
    L.check_config(self, ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"))
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.embedding_init_std is None:
      object.__setattr__(self, "embedding_init_std", self.d_model ** -0.5 if self.tie_word_embeddings else 1.0)
    if self.num_heads % self.num_kv_heads:
      raise InputError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}",
                       key="LlamaConfig.num_kv_heads")


class DecoderLayer(nn.Module):
  config: LlamaConfig
  deterministic: bool = True
  decode: bool = False
  cache_length: int = 0
  rows_per_query: int = 1

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, rotary: L.RotaryTables, token_mask: Array | None):
    cfg, det = self.config, self.deterministic
    dtype, pdtype = L.as_dtype(cfg.dtype), L.as_dtype(cfg.param_dtype)
    drop = nn.Dropout(cfg.dropout_rate)
    h = L.RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="attention_norm")(x)
    h = L.Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                    param_dtype=pdtype, dropout_rate=cfg.dropout_rate, scale_logits=True,
                    decode=self.decode, cache_length=self.cache_length, decode_prefix=True,
                    rows_per_query=self.rows_per_query,
                    name="attention")(h, h, mask, None, rotary, token_mask, deterministic=det)
    x = x + drop(h, deterministic=det)
    h = L.RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="mlp_norm")(x)
    h = L.MlpBlock(d_ff=cfg.d_ff, activations=("silu", "linear"), dropout_rate=cfg.dropout_rate, dtype=dtype,
                   param_dtype=pdtype, name="mlp")(h, deterministic=det)
    x = x + drop(h, deterministic=det)
    return L.constrain(x, ("batch", "length", "embed")), None


class LlamaTransformer(nn.Module):
  """Logits [B, T, vocab] float32 for `decoder_input_tokens`.

  Training/scoring: causal mask, restricted to equal `decoder_segment_ids` when packed; rotary positions from
  `decoder_positions` (default arange). `decode=True`: see layers.py for the cache; `token_mask` marks which of
  the fed tokens are real (left padding of prompts) and `decoder_positions` must be given.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, decoder_input_tokens: Array, decoder_positions: Array | None = None,
               decoder_segment_ids: Array | None = None, token_mask: Array | None = None,
               deterministic: bool = True, decode: bool = False, cache_length: int = 0,
               logit_positions: Array | None = None, targets: Array | None = None,
               rows_per_query: int = 1) -> Array | L.TokenStats:
    """Logits [B, L, vocab]; with `logit_positions` [B, P] only at those positions ([B, P, vocab]): a prefix-LM
    loss needs the targets' positions only, and at small widths the vocabulary projection is a large share of
    the FLOPs. With `targets` (shaped like the logits' positions), their per-token `L.TokenStats` instead (the
    logits are then projected chunk by chunk and never held whole)."""
    cfg = self.config
    dtype, pdtype = L.as_dtype(cfg.dtype), L.as_dtype(cfg.param_dtype)
    length = decoder_input_tokens.shape[1]
    embedder = L.Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.embedding_init_std, dtype=dtype,
                       param_dtype=pdtype, name="token_embedder")
    x = embedder(decoder_input_tokens)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = L.constrain(x, ("batch", "length", "embed"))
    mask = L.causal_mask(length)
    if decoder_segment_ids is not None:
      mask = mask & L.segment_mask(decoder_segment_ids, decoder_segment_ids)
    rotary = L.rotary_tables(decoder_positions, cfg.head_dim, cfg.rope_theta, length)
    x = L.apply_layers(DecoderLayer, cfg.num_layers, x, (mask, rotary, token_mask),
                       scan=cfg.scan_layers, remat_policy=cfg.remat_policy, config=cfg,
                       deterministic=deterministic, decode=decode, cache_length=cache_length,
                       rows_per_query=rows_per_query)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    x = L.RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="final_norm")(x)
    head = embedder if cfg.tie_word_embeddings else L.LogitsDense(
        cfg.d_model, cfg.vocab_size, dtype=dtype, param_dtype=pdtype, name="logits_dense")
    return L.vocab_output(head.projection(), x, targets, cfg.logits_chunk_tokens)
