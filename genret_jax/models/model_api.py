"""t5x-style model wrappers: the one interface training, decoding and scaling use (docs/design.md "Model contract").

`EncoderDecoderModel(T5Config)` and `DecoderOnlyModel(LlamaConfig)` expose
* `init(rng, batch_shapes) -> params` (unboxed), `abstract_params(batch_shapes)` (boxed, with logical axes),
  `param_shardings(mesh, batch_shapes)`, `init_sharded(rng, batch_shapes, mesh)`;
* `loss_fn(params, batch, dropout_rng) -> (loss, metrics)`: mean cross-entropy over `decoder_loss_weights`
  (+ optional z-loss), batch = seqio feature-converter output, packed or not;
* `score_batch(params, batch) -> (sum_logprob [B], mean_logprob [B])` over `decoder_loss_weights` only;
* `decode_init(params, inputs, max_decode_len) -> (cache, first_tokens [B])` and
  `tokens_to_logits(params, cache, tokens [N], step) -> (logits [N, V] float32, cache)`: every cache leaf has the
  flattened batch as leading axis; per-row positions live in the cache (`step` is informational). Leaves under
  `cache["per_query"]` (T5's projected encoder keys/values, LLaMA's prefilled prompt) keep one row per query
  even when the search runs N = B * K rows: they are the same for every beam of a query, so the beam search
  neither repeats nor gathers them, and attention folds the K beams into its query axis for them. Leaves under
  `cache["in_place"]` (self-attention keys/values) are repeated but never reordered: `tokens_to_logits` treats
  the rows of one query as a group and reads a beam's history through `cache_rows` (layers.py), which is
  reordered with `cache["cache"]`. The keys/values merged back into `cache["cache"]` and gathered with it are the
  equivalent layout the tests compare against;
* `continuation_stats(params, cache, tokens [N, T], targets [N, T]) -> layers.TokenStats`: teacher-forced scoring
  of T tokens at once after a `decode_init` cache (CGL scores thousands of targets per query this way, the query
  run once);
* `greedy_decode(params, inputs, max_decode_len, eos_id=1) -> tokens [B, max_decode_len]` for self-checks.

All methods enter the logical axis rules, so under `jax.set_mesh(mesh)` activations are constrained to the mesh.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import flax.linen as nn
import flax.traverse_util
import gin
import jax
import jax.numpy as jnp

from genret_jax.models import layers, partitioning
from genret_jax.models.llama import LlamaConfig, LlamaTransformer
from genret_jax.models.t5 import T5Config, T5Transformer

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any


def _rng_context():
  """On CPU, trace random ops with the classic (non-partitionable) threefry.

  XLA:CPU compiles the partitionable threefry very slowly here (~7 s of CPU per random op, i.e. minutes for a
  model init); CPU runs are single-host, so partitionable bits buy nothing. Accelerators keep the default.
  """
  if jax.default_backend() == "cpu":
    return jax.threefry_partitionable(False)
  return contextlib.nullcontext()


class BaseModel:
  """Shared loss / score / sharding logic; subclasses define `_logits`, `_dummy_batch` and decoding."""

  FEATURE_CONVERTER_CLS_NAME = ""
  family = ""

  def __init__(self, config, z_loss: float = 0.0, label_smoothing: float = 0.0,
               rules: partitioning.LogicalRules = partitioning.LOGICAL_AXIS_RULES):
    self.config = config
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.rules = rules
    self.module = self._make_module(config)

  # ---- construction -------------------------------------------------------------------------------------
  def _make_module(self, config) -> nn.Module:
    raise NotImplementedError

  def _dummy_batch(self, batch_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Array]:
    raise NotImplementedError

  def _init_boxed(self, rng: Array, batch_shapes) -> Params:
    batch = self._dummy_batch(batch_shapes)
    with nn.logical_axis_rules(self.rules), _rng_context():
      return self.module.init({"params": rng}, **batch)["params"]

  def init(self, rng: Array, batch_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Params:
    """Unboxed float params; `batch_shapes` maps feature names to shapes (defaults to a [1, 8] batch)."""
    return nn.meta.unbox(self._init_boxed(rng, batch_shapes))

  def abstract_params(self, batch_shapes=None) -> Params:
    """Boxed `nn.LogicallyPartitioned` ShapeDtypeStructs: shapes and logical axes, no allocation."""
    return jax.eval_shape(lambda r: self._init_boxed(r, batch_shapes), jax.random.key(0))

  def param_shardings(self, mesh: jax.sharding.Mesh, batch_shapes=None) -> Params:
    return partitioning.param_shardings(self.abstract_params(batch_shapes), mesh, self.rules)

  def init_sharded(self, rng: Array, mesh: jax.sharding.Mesh, batch_shapes=None) -> Params:
    """Params created directly in their shardings (never materialised on one device)."""
    shardings = self.param_shardings(mesh, batch_shapes)
    with jax.set_mesh(mesh):
      return jax.jit(lambda r: self.init(r, batch_shapes), out_shardings=shardings)(rng)

  def _apply(self, params: Params, *args, rngs=None, **kwargs):
    with nn.logical_axis_rules(self.rules), _rng_context():
      return self.module.apply({"params": params}, *args, rngs=rngs, **kwargs)

  # ---- training and scoring -----------------------------------------------------------------------------
  def _logits(self, params: Params, batch: Batch, dropout_rng: Array | None,
              targets: Array | None = None) -> Array | layers.TokenStats:
    """Logits [B, T, vocab] of a feature-converter batch; with `targets`, their `layers.TokenStats` instead."""
    raise NotImplementedError

  @staticmethod
  def _targets_and_weights(batch: Batch) -> tuple[Array, Array]:
    targets = batch["decoder_target_tokens"]
    return targets, batch.get("decoder_loss_weights", (targets > 0)).astype(jnp.float32)

  def _loss_stats(self, params: Params, batch: Batch, dropout_rng: Array | None):
    """(token stats, weights, dropped): the per-token statistics `loss_fn` reads with their weights; `dropped`
    counts weighted tokens left out (a subclass may score fewer positions; here every position, so 0)."""
    targets, weights = self._targets_and_weights(batch)
    stats = self._logits(params, batch, dropout_rng, targets=targets)
    return stats, weights, jnp.zeros((), jnp.float32)

  def loss_fn(self, params: Params, batch: Batch, dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """Mean token cross-entropy over `decoder_loss_weights` (dropout on iff `dropout_rng` is given)."""
    stats, weights, dropped = self._loss_stats(params, batch, dropout_rng)
    ce = -stats.log_prob
    if self.label_smoothing > 0.0:
      ce = (1.0 - self.label_smoothing) * ce - self.label_smoothing * stats.mean_log_prob
    num_tokens = jnp.sum(weights)
    denom = jnp.maximum(num_tokens, 1.0)
    cross_ent = jnp.sum(ce * weights) / denom
    z_loss = self.z_loss * jnp.sum(jnp.square(stats.log_z) * weights) / denom
    accuracy = jnp.sum(stats.correct * weights) / denom
    loss = cross_ent + z_loss
    return loss, {"loss": loss, "cross_ent_loss": cross_ent, "z_loss": z_loss, "accuracy": accuracy,
                  "num_tokens": num_tokens, "dropped_tokens": dropped}

  def score_batch(self, params: Params, batch: Batch) -> tuple[Array, Array]:
    """(sum, mean) teacher-forced target log-likelihood per example, over `decoder_loss_weights` only
    (every position: scored targets need not fit a training `loss_positions` bound)."""
    targets, weights = self._targets_and_weights(batch)
    stats = self._logits(params, batch, None, targets=targets)
    total = jnp.sum(stats.log_prob * weights, axis=-1)
    return total, total / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)

  # ---- decoding -----------------------------------------------------------------------------------------
  def decode_init(self, params: Params, inputs: Array, max_decode_len: int) -> tuple[Any, Array]:
    raise NotImplementedError

  def tokens_to_logits(self, params: Params, cache: Any, tokens: Array, step: Array | int) -> tuple[Array, Any]:
    raise NotImplementedError

  def continuation_stats(self, params: Params, cache: Any, tokens: Array, targets: Array) -> layers.TokenStats:
    """Per-token stats of `targets` [N, T] teacher-forced after each cache row, in one multi-token step.

    `cache` is a `decode_init` cache made with `max_decode_len >= T`, its per-row leaves (and `position`) repeated
    to N rows, e.g. R consecutive rows per input (per-query leaves keep one row per input, as in beam search);
    `tokens` are the decoder inputs: each row's first token from `decode_init`, then `targets[:, :-1]`.
    """
    raise NotImplementedError

  def greedy_decode(self, params: Params, inputs: Array, max_decode_len: int, eos_id: int = 1) -> Array:
    """Argmax decoding with the KV cache; after EOS a row emits 0 (padding). Returns [B, max_decode_len]."""
    cache, tok = self.decode_init(params, inputs, max_decode_len)
    batch = inputs.shape[0]

    def body(step, carry):
      cache, tok, out, done = carry
      logits, cache = self.tokens_to_logits(params, cache, tok, step)
      nxt = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
      out = out.at[:, step].set(nxt)
      return cache, nxt, out, done | (nxt == eos_id)

    init = (cache, tok, jnp.zeros((batch, max_decode_len), jnp.int32), jnp.zeros((batch,), jnp.bool_))
    return jax.lax.fori_loop(0, max_decode_len, body, init)[2]


def _cache_length(cache: Mapping[str, Any]) -> int:
  """Static cache length, read off the shape of any self-attention `key_mask` leaf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache["cache"])[0]:
    if getattr(path[-1], "key", None) == "key_mask":
      return leaf.shape[-1]
  raise ValueError("cache has no key_mask leaf")


# Cache leaves that are the same for every beam of a query: T5's projected encoder output, LLaMA's prompt.
_PER_QUERY_LEAVES = ("cross_key", "cross_value", "cross_mask", "prefix_key", "prefix_value", "prefix_mask")
# Per-row leaves a beam reorder leaves in place: the self-attention keys/values, read through `cache_rows`.
_IN_PLACE_LEAVES = ("cached_key", "cached_value")
_PARTS = ("cache", "in_place", "per_query")


def _split_cache(cache: Mapping[str, Any]) -> dict[str, dict]:
  """flax `cache` collection -> {"cache": per-row leaves, "in_place": per-row keys/values, "per_query": ...}."""
  flat = flax.traverse_util.flatten_dict(cache)
  # Rows per query are read off the per-query leaves (`_rows_per_query`); a cache without them keeps its
  # keys/values with the leaves a beam reorder gathers.
  grouped = any(k[-1] in _PER_QUERY_LEAVES for k in flat)
  part = lambda k: ("per_query" if k[-1] in _PER_QUERY_LEAVES
                    else "in_place" if grouped and k[-1] in _IN_PLACE_LEAVES else "cache")
  return {name: flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if part(k) == name})
          for name in _PARTS}


def _merge_cache(cache: Mapping[str, Any]) -> dict:
  """The flax `cache` collection of a split cache (its parts together)."""
  flat = {}
  for name in _PARTS:
    flat.update(flax.traverse_util.flatten_dict(cache.get(name, {})))
  return flax.traverse_util.unflatten_dict(flat)


def _updated(new_cache: Mapping[str, Any], cache: Mapping[str, Any]) -> dict:
  """`cache` with the per-row parts taken from an updated flax cache (the per-query leaves never change)."""
  new = flax.traverse_util.flatten_dict(new_cache)
  out = dict(cache)
  for name in ("cache", "in_place"):
    if name in cache:
      out[name] = flax.traverse_util.unflatten_dict(
          {key: new[key] for key in flax.traverse_util.flatten_dict(cache[name])})
  return out


def _rows_per_query(cache: Mapping[str, Any], rows: int) -> int:
  """Rows per query of a decode step over `rows` rows: beams (or CGL targets) of one query form a group whose
  per-query leaves have one row. Without per-query leaves every row is its own group."""
  leaves = jax.tree.leaves(cache.get("per_query", {}))
  return rows // leaves[0].shape[0] if leaves else 1


@gin.configurable(module="models")
class EncoderDecoderModel(BaseModel):
  """T5 encoder-decoder; batches from seqio `EncDecFeatureConverter`."""

  FEATURE_CONVERTER_CLS_NAME = "EncDecFeatureConverter"
  family = "t5"

  def __init__(self, config: T5Config = gin.REQUIRED, z_loss: float = 0.0, label_smoothing: float = 0.0,
               rules: partitioning.LogicalRules = partitioning.LOGICAL_AXIS_RULES):
    super().__init__(config, z_loss, label_smoothing, rules)

  def _make_module(self, config):
    return T5Transformer(config)

  def _dummy_batch(self, batch_shapes):
    shapes = dict(batch_shapes or {})
    enc = shapes.get("encoder_input_tokens", (1, 8))
    dec = shapes.get("decoder_input_tokens", (1, 8))
    return {"encoder_input_tokens": jnp.ones(enc, jnp.int32), "decoder_input_tokens": jnp.ones(dec, jnp.int32)}

  def _logits(self, params, batch, dropout_rng, targets=None):
    return self._apply(params, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                       encoder_segment_ids=batch.get("encoder_segment_ids"),
                       decoder_segment_ids=batch.get("decoder_segment_ids"),
                       deterministic=dropout_rng is None, targets=targets,
                       rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  def decode_init(self, params, inputs, max_decode_len):
    """Encodes `inputs` [B, Lin] once; the cache holds the projected encoder keys/values and mask per layer."""
    inputs = jnp.asarray(inputs, jnp.int32)
    batch = inputs.shape[0]
    segments = (inputs > 0).astype(jnp.int32)
    encoded = self._apply(params, inputs, method=T5Transformer.encode)
    first = jnp.zeros((batch,), jnp.int32)  # decoder_start_token_id = 0
    with nn.logical_axis_rules(self.rules):
      _, variables = self.module.apply(
          {"params": params}, encoded, segments, first[:, None], decode=True, cache_length=max_decode_len,
          method=T5Transformer.decode, mutable=["cache"])
    return {**_split_cache(variables["cache"]), "position": jnp.zeros((batch,), jnp.int32)}, first

  def tokens_to_logits(self, params, cache, tokens, step):
    del step  # per-row positions are in the cache
    with nn.logical_axis_rules(self.rules):
      logits, variables = self.module.apply(
          {"params": params, "cache": _merge_cache(cache)}, None, None, tokens[:, None],
          decoder_positions=cache["position"][:, None], decode=True, cache_length=_cache_length(cache),
          rows_per_query=_rows_per_query(cache, tokens.shape[0]), method=T5Transformer.decode, mutable=["cache"])
    return logits[:, 0], {**_updated(variables["cache"], cache), "position": cache["position"] + 1}

  def continuation_stats(self, params, cache, tokens, targets):
    positions = cache["position"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    with nn.logical_axis_rules(self.rules):
      stats, _ = self.module.apply(
          {"params": params, "cache": _merge_cache(cache)}, None, None, tokens,
          decoder_positions=positions, decode=True, cache_length=_cache_length(cache), targets=targets,
          method=T5Transformer.decode, mutable=["cache"])
    return stats


@gin.configurable(module="models")
class DecoderOnlyModel(BaseModel):
  """LLaMA prefix-LM; batches from seqio `DecoderFeatureConverter` (PrefixLM: inputs and targets concatenated,
  `decoder_loss_weights` on the targets only). Attention is causal everywhere."""

  FEATURE_CONVERTER_CLS_NAME = "DecoderFeatureConverter"
  family = "llama"

  def __init__(self, config: LlamaConfig = gin.REQUIRED, z_loss: float = 0.0, label_smoothing: float = 0.0,
               rules: partitioning.LogicalRules = partitioning.LOGICAL_AXIS_RULES, loss_positions: int = 0):
    """`loss_positions` P > 0: `loss_fn` computes logits only at the first P weighted positions of each row
    (non-packed prefix-LM: the targets length), not at every input position. A row with more weighted tokens is
    never silently cut: the loss metrics count them (`dropped_tokens`, which the trainer turns into an error).
    0: every position. `score_batch` always scores every position."""
    super().__init__(config, z_loss, label_smoothing, rules)
    self.loss_positions = int(loss_positions)

  def _make_module(self, config):
    return LlamaTransformer(config)

  def _loss_stats(self, params, batch, dropout_rng):
    targets, weights = self._targets_and_weights(batch)
    p, length = self.loss_positions, targets.shape[1]
    if p <= 0 or p >= length:
      return super()._loss_stats(params, batch, dropout_rng)
    # The first P weighted positions of each row, in order (unweighted positions sort after them and carry
    # weight 0 where a row has fewer than P).
    pos = jnp.sort(jnp.where(weights > 0, 0, length) + jnp.arange(length)[None, :], axis=-1)[:, :p] % length
    take = lambda x: jnp.take_along_axis(x, pos, axis=1)
    sel_weights = take(weights)
    stats = self._logits(params, batch, dropout_rng, logit_positions=pos, targets=take(targets))
    return stats, sel_weights, jnp.sum(weights) - jnp.sum(sel_weights)

  def _dummy_batch(self, batch_shapes):
    shape = dict(batch_shapes or {}).get("decoder_input_tokens", (1, 8))
    return {"decoder_input_tokens": jnp.ones(shape, jnp.int32)}

  def _logits(self, params, batch, dropout_rng, targets=None, logit_positions=None):
    return self._apply(params, batch["decoder_input_tokens"], decoder_positions=batch.get("decoder_positions"),
                       decoder_segment_ids=batch.get("decoder_segment_ids"), logit_positions=logit_positions,
                       targets=targets,
                       deterministic=dropout_rng is None,
                       rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  def decode_init(self, params, inputs, max_decode_len):
    """Prefills the prompt `[0] + inputs[b, :n_b]` (0 = the shift-right start token of the feature converter).

    Prompts are left-padded to a common length Lin + 1, so every row's last prompt token sits in the same column:
    the first Lin columns are prefilled into the per-query prefix cache (`cache["per_query"]`, padding masked
    out; never repeated per beam nor reordered, see layers.py), the last prompt token is returned as
    `first_tokens`, and rotary positions count from each row's real start. The per-row cache holds
    `max_decode_len` generated tokens.
    """
    inputs = jnp.asarray(inputs, jnp.int32)
    batch, lin = inputs.shape
    n = jnp.sum(inputs > 0, axis=1).astype(jnp.int32)
    full = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), inputs], axis=1)  # [B, Lin + 1]
    pad = (lin - n)[:, None]
    cols = jnp.arange(lin + 1)[None]
    valid = cols >= pad
    prompt = jnp.where(valid, jnp.take_along_axis(full, jnp.maximum(cols - pad, 0), axis=1), 0)
    positions = jnp.maximum(cols - pad, 0)
    with nn.logical_axis_rules(self.rules):
      _, variables = self.module.apply({"params": params}, prompt[:, :lin], positions[:, :lin],
                                       token_mask=valid[:, :lin], decode=True, cache_length=max_decode_len,
                                       mutable=["cache"])
    return {**_split_cache(variables["cache"]), "position": n}, prompt[:, lin]

  def tokens_to_logits(self, params, cache, tokens, step):
    del step  # per-row positions are in the cache
    with nn.logical_axis_rules(self.rules):
      logits, variables = self.module.apply(
          {"params": params, "cache": _merge_cache(cache)}, tokens[:, None], cache["position"][:, None],
          decode=True, cache_length=_cache_length(cache), rows_per_query=_rows_per_query(cache, tokens.shape[0]),
          mutable=["cache"])
    return logits[:, 0], {**_updated(variables["cache"], cache), "position": cache["position"] + 1}

  def continuation_stats(self, params, cache, tokens, targets):
    positions = cache["position"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    with nn.logical_axis_rules(self.rules):
      stats, _ = self.module.apply({"params": params, "cache": _merge_cache(cache)}, tokens, positions,
                                   decode=True, cache_length=_cache_length(cache), targets=targets,
                                   mutable=["cache"])
    return stats


@gin.configurable(module="models")
def get_model(model: BaseModel = gin.REQUIRED) -> BaseModel:
  """The model a gin config describes (`models.get_model.model = %MODEL` in every size gin)."""
  return model


def model_for_config(config, loss_positions: int = 0) -> BaseModel:
  """The wrapper matching a config object's family (`loss_positions`: see `DecoderOnlyModel`; T5 ignores it,
  its decoder positions are the targets already)."""
  if isinstance(config, T5Config):
    return EncoderDecoderModel(config)
  if isinstance(config, LlamaConfig):
    return DecoderOnlyModel(config, loss_positions=loss_positions)
  raise TypeError(f"unknown model config {type(config).__name__}")
