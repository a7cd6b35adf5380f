"""T5 v1.1 encoder-decoder in Flax Linen (one file, read top to bottom).

RMS norm without bias, bucketed relative position bias (one table per stack, shared by its layers), gated-GELU
feed-forward, no biases, dropout, untied input/output embeddings (T5 v1.0's tied embeddings and ReLU FFN are
options, so `t5-small` itself can be expressed). The decoder starts from token 0.

Parameter layout (unscanned; with `scan_layers` the `layers_{i}` become one `layers` stack with a leading axis):
  token_embedder/embedding                         [vocab, embed]   shared by encoder and decoder
  encoder/relpos_bias/rel_embedding                [buckets, heads]
  encoder/layers_{i}/{pre_attention_layer_norm, attention/{query,key,value,out}, pre_mlp_layer_norm, mlp/...}
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_{i}/{pre_self_attention_layer_norm, self_attention, pre_cross_attention_layer_norm,
                      encoder_decoder_attention, pre_mlp_layer_norm, mlp}
  decoder/decoder_norm/scale, decoder/logits_dense/kernel [embed, vocab] (untied only)
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from genret_jax.models import layers as L

Array = jax.Array


@gin.configurable(module="models")
@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyper-parameters (defaults: T5 v1.1 small)."""
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  head_dim: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  tie_word_embeddings: bool = False
  scale_decoder_outputs: bool | None = None  # x d_model**-0.5 before the logits; None: iff tied (T5 v1.0)
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = False
  # Tokens per vocabulary-projection chunk when only per-token statistics are needed (loss, scoring):
  # `layers.projected_token_stats`. 0: one projection of every position.
  logits_chunk_tokens: int = 1024

  family = "t5"

  def __post_init__(self):
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    L.check_config(self, ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                        "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"))


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's bucketing of (key - query) distances: exact for small, logarithmic up to max_distance."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions: Array, k_positions: Array) -> Array:
    """q_positions [B|1, T], k_positions [B|1, S] -> bias [B|1, heads, T, S]."""
    cfg = self.config
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(1.0), ("relpos_buckets", "heads")),
                       (cfg.relative_attention_num_buckets, cfg.num_heads), L.as_dtype(cfg.param_dtype))
    rel = k_positions[:, None, :] - q_positions[:, :, None]
    bucket = relative_position_bucket(rel, self.bidirectional, cfg.relative_attention_num_buckets,
                                      cfg.relative_attention_max_distance)
    bias = jnp.take(jnp.asarray(table), bucket, axis=0)  # [B, T, S, H]
    return jnp.transpose(bias, (0, 3, 1, 2)).astype(L.as_dtype(cfg.dtype))


def _attention(cfg: T5Config, name: str, **kw) -> L.Attention:
  return L.Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
                     dtype=L.as_dtype(cfg.dtype), param_dtype=L.as_dtype(cfg.param_dtype),
                     dropout_rate=cfg.dropout_rate, scale_logits=False,
                     query_init_scale=cfg.head_dim ** -0.5, name=name, **kw)


def _norm(cfg: T5Config, name: str) -> L.RMSNorm:
  return L.RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=L.as_dtype(cfg.dtype),
                   param_dtype=L.as_dtype(cfg.param_dtype), name=name)


def _mlp(cfg: T5Config) -> L.MlpBlock:
  return L.MlpBlock(d_ff=cfg.d_ff, activations=cfg.mlp_activations, dropout_rate=cfg.dropout_rate,
                    dtype=L.as_dtype(cfg.dtype), param_dtype=L.as_dtype(cfg.param_dtype), name="mlp")


class EncoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array):
    cfg, drop = self.config, nn.Dropout(self.config.dropout_rate)
    h = _norm(cfg, "pre_attention_layer_norm")(x)
    h = _attention(cfg, "attention")(h, h, mask, bias, deterministic=self.deterministic)
    x = x + drop(h, deterministic=self.deterministic)
    h = _mlp(cfg)(_norm(cfg, "pre_mlp_layer_norm")(x), deterministic=self.deterministic)
    x = x + drop(h, deterministic=self.deterministic)
    return L.constrain(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  cache_length: int = 0
  rows_per_query: int = 1

  @nn.compact
  def __call__(self, x: Array, encoded: Array | None, self_mask: Array | None, self_bias: Array,
               cross_mask: Array | None):
    cfg, drop, det = self.config, nn.Dropout(self.config.dropout_rate), self.deterministic
    h = _norm(cfg, "pre_self_attention_layer_norm")(x)
    h = _attention(cfg, "self_attention", decode=self.decode, cache_length=self.cache_length,
                   rows_per_query=self.rows_per_query)(
        h, h, self_mask, self_bias, deterministic=det)
    x = x + drop(h, deterministic=det)
    h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
    h = _attention(cfg, "encoder_decoder_attention", is_cross_attention=True, decode=self.decode)(
        h, encoded, cross_mask, deterministic=det)
    x = x + drop(h, deterministic=det)
    h = _mlp(cfg)(_norm(cfg, "pre_mlp_layer_norm")(x), deterministic=det)
    x = x + drop(h, deterministic=det)
    return L.constrain(x, ("batch", "length", "embed")), None


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None = None, deterministic: bool = True) -> Array:
    cfg = self.config
    segments = (tokens > 0).astype(jnp.int32) if segment_ids is None else segment_ids
    x = self.shared_embedding(tokens)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = L.constrain(x, ("batch", "length", "embed"))
    pos = jnp.arange(tokens.shape[1])[None]
    bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(pos, pos)
    mask = L.segment_mask(segments, segments)
    x = L.apply_layers(EncoderLayer, cfg.num_encoder_layers, x, (mask, bias), scan=cfg.scan_layers,
                       remat_policy=cfg.remat_policy, config=cfg, deterministic=deterministic)
    x = _norm(cfg, "encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array | None, encoder_segments: Array | None, decoder_input_tokens: Array,
               decoder_positions: Array | None = None, decoder_segment_ids: Array | None = None,
               deterministic: bool = True, decode: bool = False, cache_length: int = 0,
               targets: Array | None = None, rows_per_query: int = 1) -> Array | L.TokenStats:
    """Logits [B, T, vocab]; with `targets` [B, T], their per-token `L.TokenStats` instead (the logits are then
    projected chunk by chunk and never held whole). `rows_per_query`: see `layers.Attention` (decode)."""
    cfg = self.config
    batch, length = decoder_input_tokens.shape
    x = self.shared_embedding(decoder_input_tokens)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = L.constrain(x, ("batch", "length", "embed"))
    relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
    if decode:  # queries at their per-row positions, keys at the cache slots (slot == position)
      q_pos = (jnp.zeros((batch, length), jnp.int32) if decoder_positions is None else decoder_positions)
      self_bias = relpos(q_pos, jnp.arange(cache_length)[None])
      self_mask = L.causal_mask(length)  # only used by the cache-creation call
    else:
      pos = jnp.arange(length)[None]  # within a packed segment, arange differences == position differences
      self_bias = relpos(pos, pos)
      self_mask = L.causal_mask(length)
      if decoder_segment_ids is not None:
        self_mask = self_mask & L.segment_mask(decoder_segment_ids, decoder_segment_ids)
    cross_mask = None
    if encoder_segments is not None:
      if decoder_segment_ids is not None and not decode:
        cross_mask = L.segment_mask(decoder_segment_ids, encoder_segments)
      else:
        cross_mask = (encoder_segments > 0)[:, None, None, :]
    x = L.apply_layers(DecoderLayer, cfg.num_decoder_layers, x, (encoded, self_mask, self_bias, cross_mask),
                       scan=cfg.scan_layers, remat_policy=cfg.remat_policy, config=cfg,
                       deterministic=deterministic, decode=decode, cache_length=cache_length,
                       rows_per_query=rows_per_query)
    x = _norm(cfg, "decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    scale = cfg.tie_word_embeddings if cfg.scale_decoder_outputs is None else cfg.scale_decoder_outputs
    if scale:  # T5 v1.0 rescales before the tied projection
      x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
    head = self.shared_embedding if cfg.tie_word_embeddings else L.LogitsDense(
        cfg.d_model, cfg.vocab_size, dtype=L.as_dtype(cfg.dtype), param_dtype=L.as_dtype(cfg.param_dtype),
        name="logits_dense")
    return L.vocab_output(head.projection(), x, targets, cfg.logits_chunk_tokens)


class T5Transformer(nn.Module):
  """`encode`, `decode` and `__call__` (teacher-forced logits [B, T, vocab] float32)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = L.Embed(cfg.vocab_size, cfg.d_model, init_std=1.0, dtype=L.as_dtype(cfg.dtype),
                                  param_dtype=L.as_dtype(cfg.param_dtype))
    self.encoder = Encoder(cfg, shared_embedding=self.token_embedder)
    self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             deterministic: bool = True) -> Array:
    return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic)

  def decode(self, encoded: Array | None, encoder_segments: Array | None, decoder_input_tokens: Array,
             decoder_positions: Array | None = None, decoder_segment_ids: Array | None = None,
             deterministic: bool = True, decode: bool = False, cache_length: int = 0,
             targets: Array | None = None, rows_per_query: int = 1) -> Array | L.TokenStats:
    return self.decoder(encoded, encoder_segments, decoder_input_tokens, decoder_positions, decoder_segment_ids,
                        deterministic=deterministic, decode=decode, cache_length=cache_length, targets=targets,
                        rows_per_query=rows_per_query)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, decoder_positions: Array | None = None,
               deterministic: bool = True, targets: Array | None = None) -> Array | L.TokenStats:
    del encoder_positions  # relative attention only needs within-segment distances
    encoder_segments = ((encoder_input_tokens > 0).astype(jnp.int32) if encoder_segment_ids is None
                        else encoder_segment_ids)
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic)
    return self.decode(encoded, encoder_segments, decoder_input_tokens, decoder_positions, decoder_segment_ids,
                       deterministic=deterministic, targets=targets)
