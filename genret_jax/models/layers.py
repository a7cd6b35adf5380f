"""Building blocks shared by the T5 and LLaMA families: norm, embedding, projections, attention with a KV cache,
gated MLP, rotary embeddings, and the layer-stacking helper (python loop or `nn.scan`, optional remat).

Conventions:
* every parameter is created with `nn.with_logical_partitioning` (logical names resolved by `partitioning.py`);
* compute runs in `dtype` (e.g. bfloat16), parameters live in `param_dtype` (float32); norms and softmax run in
  float32;
* attention masks are booleans broadcastable to [batch, 1, q_len, kv_len], True = may attend.

KV cache (flax `cache` collection). A self-attention layer in `decode` mode holds, all with the batch leading:
`cached_key`/`cached_value` [B, kv_heads, Lc, head_dim] (heads first: the layout the attention products read, so
no step transposes the cache), `key_mask` [B, Lc] (1 = slot holds a real token),
`cache_index` [B] (next slot to write), `cache_rows` [B, Lc] (which row of its query holds each slot; below).
The first `decode` call only creates the (zero) cache; each later call appends its T tokens at every row's own
index and attends causally over the valid slots, so one code path serves a multi-token prefill (left padding marked
by `token_mask`) and single-token steps.

Beam reordering without moving keys/values. With `rows_per_query` R > 1 the rows are R-row groups (a query's beams)
and `cached_key`/`cached_value` stay where each row wrote them: a reordered beam reads slot s from row
`cache_rows[b, s]` of its group, a per-group gather inside attention (local to a batch shard). The beam search
reorders only the small per-row leaves (`key_mask`, `cache_index`, `cache_rows`) and leaves the keys/values alone
(`model_api` puts them under `cache["in_place"]`): gathering them every step also made XLA copy the gathered
buffer back into the loop carry. Rows must advance in lockstep (every call writes the same slots of every row of a
group), as beams do, so a slot some beam's history points to is never overwritten.

Cross-attention caches the projected encoder keys/values (heads first) and the encoder mask on the first call; they
may keep one row per query while the queries have one row per beam (see `Attention.__call__`).

Prefix cache (`decode_prefix=True`, LLaMA's prompt). The first `decode` call's tokens become the prefix:
`prefix_key`/`prefix_value` [B, kv_heads, P, head_dim] and `prefix_mask` [B, P], written once and never again, while
the per-row cache above starts empty and holds only the generated tokens. Later calls attend over both with one
softmax; the prefix may keep one row per query while the queries have R rows each (beams, or CGL's targets of one
input): the R rows are folded into the query axis for the prefix part, so a prompt is neither repeated per beam nor
reordered with the beams (at beam 20 the reorder of a repeated 64-token prompt was ~40% of a search's time).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax.errors import InputError, check_float, check_int

Array = jax.Array
DType = Any

NEG_INF = -1.0e10  # finite so that fully masked rows (padding queries) give a uniform softmax, never NaN

REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def as_dtype(name: str | DType) -> DType:
  return jnp.dtype(name) if isinstance(name, str) else name


def check_config(config, positive: Sequence[str]) -> None:
  """Size fields positive integers and dtypes known, named by their gin key (a bad one failed deep inside JAX:
  a negative d_model as a gather's slice size, dtype 'float13' at the first matmul)."""
  cls = type(config).__name__
  for name in positive:
    check_int(getattr(config, name), f"models.{cls}.{name}")
  # 1.0 zeroes every activation (and divides by 0); a rate above it made flax's Dropout produce NaN silently.
  check_float(config.dropout_rate, f"models.{cls}.dropout_rate", 0.0, 1.0)
  if config.dropout_rate == 1.0:
    raise InputError("must be < 1 (1 drops every activation)", key=f"models.{cls}.dropout_rate")
  for name in ("dtype", "param_dtype"):
    try:
      as_dtype(getattr(config, name))
    except TypeError as e:
      raise InputError(f"unknown dtype {getattr(config, name)!r}", key=f"models.{cls}.{name}") from e
  if config.remat_policy != "none" and config.remat_policy not in REMAT_POLICIES:
    raise InputError(f"unknown remat policy {config.remat_policy!r}; choose none or one of {sorted(REMAT_POLICIES)}",
                     key=f"models.{cls}.remat_policy")


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  return nn.with_logical_constraint(x, tuple(axes))


def kernel_init(scale: float, num_in: int, num_out: int) -> Callable:
  """Fan-in variance scaling for a kernel whose first `num_in` axes contract and last `num_out` axes are outputs."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=tuple(range(num_in)),
                                          out_axis=tuple(range(num_in, num_in + num_out)))


class TokenStats(NamedTuple):
  """What a loss or a score needs of the softmax over the vocabulary, per token."""
  log_prob: Array       # log p(target)
  log_z: Array          # logsumexp of the logits (z-loss)
  mean_log_prob: Array  # mean of log p over the vocabulary (label smoothing)
  correct: Array        # the target's logit is the largest (argmax == target up to exact ties)


def token_stats(logits: Array, targets: Array) -> TokenStats:
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  # A max compare rather than argmax == target: XLA:CPU runs argmax's (value, index) reduce unvectorised, 6 ms of
  # a 58 ms t5/r0 train step (vocab 4,096; ad-hoc profile), while the max is the one logsumexp already takes.
  correct = target_logit >= jnp.max(logits, axis=-1)
  return TokenStats(target_logit - log_z, log_z, jnp.mean(logits, axis=-1) - log_z, correct)


def projected_token_stats(project: Callable[[Array], Array], x: Array, targets: Array,
                          chunk_tokens: int) -> TokenStats:
  """`token_stats(project(x), targets)` for x [B, T, d], without the [B, T, vocab] logits in memory at once.

  The positions are cut into chunks of about `chunk_tokens` tokens (whole batch rows kept together, so batch
  sharding is unchanged) and a `lax.map` projects and reduces one chunk at a time, so each chunk's logits stay in
  cache: on CPU the one-piece projection followed by its log-softmax is bound by writing the logits, not by its
  FLOPs. Under `jax.grad` each chunk's logits are recomputed in the backward pass rather than stored.
  `chunk_tokens <= 0`, or a single chunk: one projection.
  """
  batch, length = targets.shape
  step = max(1, chunk_tokens // max(batch, 1)) if chunk_tokens > 0 else length

  def one(chunk):
    h, t = chunk
    logits = constrain(project(h).astype(jnp.float32), ("batch", "length", "vocab"))
    return token_stats(logits, t)

  if step >= length:
    return one((x, targets))
  n = -(-length // step)
  pad = n * step - length
  xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(batch, n, step, x.shape[-1]).swapaxes(0, 1)
  ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, n, step).swapaxes(0, 1)
  stats = jax.lax.map(jax.checkpoint(one), (xs, ts))
  return TokenStats(*(s.swapaxes(0, 1).reshape(batch, n * step)[:, :length] for s in stats))


def vocab_output(project: Callable[[Array], Array], x: Array, targets: Array | None,
                 chunk_tokens: int) -> Array | TokenStats:
  """The output head of both families: float32 logits [B, T, vocab] of `project(x)`, or with `targets` their
  `TokenStats` (`projected_token_stats`, chunked)."""
  if targets is not None:
    return projected_token_stats(project, x, targets, chunk_tokens)
  return constrain(project(x).astype(jnp.float32), ("batch", "length", "vocab"))


class RMSNorm(nn.Module):
  """Root-mean-square layer norm without bias or mean subtraction (T5 and LLaMA)."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding [vocab, embed]; `projection` reuses it as the output projection (tied embeddings)."""
  num_embeddings: int
  features: int
  init_std: float = 1.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(jnp.asarray(self.embedding), ids, axis=0).astype(self.dtype)

  def projection(self) -> Callable[[Array], Array]:
    """x [..., embed] -> logits [..., vocab] with the embedding as output matrix (a pure function of x, so it
    can run inside `lax.map`, see `projected_token_stats`)."""
    w = jnp.asarray(self.embedding).astype(self.dtype)
    return lambda x: jnp.einsum("...d,vd->...v", x.astype(self.dtype), w)


class LogitsDense(nn.Module):
  """Untied output projection: param `kernel` [embed, vocab], the layout (and init) of a one-axis `DenseGeneral`,
  so checkpoints and the HF converter see the same tree."""
  d_model: int
  vocab_size: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    self.kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init(1.0, 1, 1), ("embed", "vocab")),
                             (self.d_model, self.vocab_size), self.param_dtype)

  def projection(self) -> Callable[[Array], Array]:
    """x [..., embed] -> logits [..., vocab], a pure function of x (see `Embed.projection`)."""
    w = jnp.asarray(self.kernel).astype(self.dtype)
    return lambda x: jnp.dot(x.astype(self.dtype), w)


class DenseGeneral(nn.Module):
  """Bias-free projection contracting the last `num_contract` input axes into `features`."""
  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel: contracted axes then output axes
  num_contract: int = 1
  init_scale: float = 1.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.num_contract
    shape = tuple(x.shape[-c:]) + tuple(self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init(self.init_scale, c, len(self.features)),
                                                               self.axes), shape, self.param_dtype)
    # One 2-D matmul with reshapes around it: XLA:CPU emits a single GEMM for it, where a multi-axis dot_general
    # (e.g. the attention output's (heads, kv) contraction) costs extra transposes, most of them in the backward.
    lead = x.shape[:x.ndim - c]
    k_in = int(np.prod(shape[:c]))
    y = jnp.dot(x.astype(self.dtype).reshape(-1, k_in),
                jnp.asarray(kernel).astype(self.dtype).reshape(k_in, -1))
    return y.reshape(lead + tuple(self.features))


class RotaryTables(NamedTuple):
  """cos / sin of the rotary angles, [B|1, T, 1, head_dim] float32 each, "rotate half" layout (HF LLaMA)."""
  cos: Array
  sin: Array


def rotary_tables(positions: Array | None, head_dim: int, theta: float, length: int = 0) -> RotaryTables:
  """The tables for `positions` [B, T], or for positions 0..length-1 of every row when `positions` is None.

  Built once per forward pass and shared by every layer (as HF LLaMA's `position_embeddings`). XLA:CPU fuses a
  device-side cos/sin into each consumer and re-evaluates it per element and head, in the backward too (~4 ms per
  layer of the llama r2 train step, ad-hoc profile; an optimization barrier does not stop it on CPU). Without
  explicit positions the tables are therefore host constants. With them (decoding, scoring, packed rows) they go
  through a product with the identity on CPU, an op XLA:CPU does not fuse into, so cos/sin run once per pass
  (exact: x * 1 plus zeros; 40M LLaMA search 6-12% faster at beams 1-20, prefill 8-12%, ad hoc).
  """
  xp = np if positions is None else jnp   # numpy: the tables become compile-time constants
  if positions is None:
    positions = np.arange(length)[None]
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  freqs = positions.astype(xp.float32)[..., None] * inv_freq  # [B|1, T, D/2]
  cos, sin = xp.cos(freqs), xp.sin(freqs)
  if xp is jnp and jax.default_backend() == "cpu":   # T * head_dim^2 FLOPs a row (`rotary_identity_flops`)
    eye = jnp.eye(head_dim // 2, dtype=jnp.float32)
    cos, sin = (jnp.einsum("btd,de->bte", x, eye, precision=jax.lax.Precision.HIGHEST) for x in (cos, sin))
  cos, sin = (jnp.asarray(xp.concatenate([x, x], axis=-1)[:, :, None, :]) for x in (cos, sin))
  return RotaryTables(cos, sin)


def rotary_identity_flops(positions: int, head_dim: int) -> int:
  """FLOPs of `rotary_tables`' identity products for one row of `positions` device-side positions on CPU (not
  model FLOPs: the accounting leaves them out; XLA's own count includes them)."""
  return 2 * 2 * positions * (head_dim // 2) ** 2


def apply_rotary(x: Array, tables: RotaryTables) -> Array:
  """Rotary position embedding of x [B, T, H, D] ("rotate half")."""
  d = x.shape[-1]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * tables.cos + rotated * tables.sin).astype(x.dtype)


def _update_rows(buffer: Array, update: Array, index: Array, axis: int = 1) -> Array:
  """Writes update[b] into buffer[b] at offset index[b] along `axis` (per-row cache write)."""

  def one(buf, upd, i):
    start = [0] * buf.ndim
    start[axis - 1] = i
    return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), tuple(start))

  return jax.vmap(one)(buffer, update, index)


def _read_rows(cache: Array, rows: Array, r: int) -> Array:
  """cache [N, kv_heads, Lc, d] -> each row's history: slot s of row n from row `rows[n, s]` of n's R-row group.
  A batched gather per group, so a batch sharded by groups reads no other shard."""
  if r == 1:
    return cache   # a group of one row reads its own slots
  n, lc = rows.shape
  grouped = cache.reshape((n // r, r) + cache.shape[1:])
  slots = jnp.arange(lc)[None, :]
  out = jax.vmap(lambda c, i: c[i, :, slots, :])(grouped, rows.reshape(n // r, r, lc))   # [G, R, Lc, kv_heads, d]
  return out.reshape((n, lc) + cache.shape[1:2] + cache.shape[3:]).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head / grouped-query attention with an optional KV cache and rotary embeddings.

  `scale_logits=False` is T5 (the 1/sqrt(d) is folded into the query init); LLaMA scales.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  scale_logits: bool = True
  query_init_scale: float = 1.0
  init_scale: float = 1.0
  is_cross_attention: bool = False
  decode: bool = False
  cache_length: int = 0
  decode_prefix: bool = False   # decode: the first call's tokens are a per-query prefix (module docstring)
  rows_per_query: int = 1       # decode: rows per beam group reading through `cache_rows` (module docstring)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None, mask: Array | None = None,
               bias: Array | None = None, rotary: RotaryTables | None = None,
               token_mask: Array | None = None, deterministic: bool = True) -> Array:
    h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
    dense = functools.partial(DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense((h, d), ("embed", "heads", "kv"), init_scale=self.query_init_scale, name="query")(inputs_q)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    batch, q_len = inputs_q.shape[0], inputs_q.shape[1]

    heads_major = self.decode   # cached keys/values are [B, kv_heads, S, head_dim]
    prefix = None
    if self.is_cross_attention and self.decode:
      k, v, mask = self._cross_cache(inputs_kv, mask, dense)
    else:
      k = dense((hkv, d), ("embed", "kv_heads", "kv"), init_scale=self.init_scale, name="key")(inputs_kv)
      v = dense((hkv, d), ("embed", "kv_heads", "kv"), init_scale=self.init_scale, name="value")(inputs_kv)
      if rotary is not None:
        q = apply_rotary(q, rotary)
        k = apply_rotary(k, rotary)  # self-attention: keys are the queries' tokens
      if self.decode:
        k, v, mask, prefix = self._self_cache(k, v, mask, token_mask, batch, q_len)
    kv_axes = ("batch", "kv_heads", "length", "kv") if heads_major else ("batch", "length", "kv_heads", "kv")
    k, v = constrain(k, kv_axes), constrain(v, kv_axes)
    ks = "bksd" if heads_major else "bskd"   # einsum subscripts of the keys / values

    if self.scale_logits:
      q = q * jnp.asarray(d ** -0.5, q.dtype)
    if prefix is not None:
      if bias is not None:
        raise ValueError("attention: a position bias with a prefix cache is not supported")
      return self._out(self._attend_with_prefix(q, k, v, mask, prefix, deterministic), inputs_q, dense)
    rows = batch
    if k.shape[0] != batch:
      # Beam search keeps one row of encoder keys per query (the same for all its beams): the beams of a
      # query become extra query positions, so [B*K, T] queries attend [B, S] keys without repeating them.
      if batch % k.shape[0]:
        raise ValueError(f"attention: {batch} query rows do not divide over {k.shape[0]} key rows")
      batch, q_len = k.shape[0], (batch // k.shape[0]) * q_len
      q = q.reshape(batch, q_len, h, d)
    groups = h // hkv
    kv_len = k.shape[2] if heads_major else k.shape[1]
    if groups > 1:   # grouped-query: a group axis so K/V are shared without being repeated in memory
      qg = q.reshape(batch, q_len, hkv, groups, d)
      logits = jnp.einsum(f"btkgd,{ks}->bkgts", qg, k).astype(jnp.float32)
      logits = logits.reshape(batch, h, q_len, kv_len)
    else:            # multi-head: plain 4-D einsums (fewer transposes on CPU than the 5-D form)
      logits = jnp.einsum(f"btkd,{ks}->bkts", q, k).astype(jnp.float32)
    if bias is not None:
      bias = bias[..., :kv_len]  # the cache-creation call gets a bias sized for the cache; it attends to 1 token
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if self.dropout_rate > 0.0 and not deterministic:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    # Weighted values as a plain batched matmul over (batch, kv_heads) with its natural [.., t, d] output, then
    # one explicit transpose: asked for the [b, t, k, d] layout directly, XLA:CPU emits a slow non-YNN batched dot
    # (decode-step cross-attention 0.64 -> 0.08 ms, train-shaped forward 3.7 -> 1.9 ms; ad-hoc microbenchmark).
    v_hm = v if heads_major else v.transpose(0, 2, 1, 3)   # [B, kv_heads, S, head_dim]
    if groups > 1:
      wg = weights.reshape(batch, hkv, groups, q_len, kv_len)
      out = jnp.einsum("bkgts,bksd->bkgtd", wg, v_hm).transpose(0, 3, 1, 2, 4).reshape(batch, q_len, h, d)
    else:
      out = jnp.einsum("bkts,bksd->bktd", weights, v_hm).transpose(0, 2, 1, 3)
    return self._out(out.reshape(rows, -1, h, d), inputs_q, dense)

  def _out(self, out: Array, inputs_q: Array, dense: Callable) -> Array:
    out = constrain(out, ("batch", "length", "heads", "kv"))
    return dense((inputs_q.shape[-1],), ("heads", "kv", "embed"), num_contract=2, init_scale=self.init_scale,
                 name="out")(out)

  def _attend_with_prefix(self, q: Array, k: Array, v: Array, mask: Array, prefix: tuple[Array, Array, Array],
                          deterministic: bool) -> Array:
    """One softmax over a per-query prefix and each row's own cached tokens. q [N, T, h, d] (already scaled);
    own k/v [N, kv_heads, S, d] with mask [N, 1, T, S]; prefix keys/values [Bp, kv_heads, P, d] with mask
    [Bp, 1, 1, P], N = Bp * R. Returns [N, T, h, d].

    The softmax is taken in its two parts (shared max, summed denominators) rather than over concatenated logits:
    the prefix part stays in its folded layout, so only q and the prefix part's output change layout, not the
    [.., P] logits and weights (with CGL's multi-token steps the concatenated form was 14% slower than a prompt
    repeated per row; ad hoc)."""
    pk, pv, pmask = prefix
    n, t, h, d = q.shape
    hkv, groups = k.shape[1], h // k.shape[1]
    bp = pk.shape[0]
    if n % bp:
      raise ValueError(f"attention: {n} query rows do not divide over {bp} prefix rows")
    r, gt = n // bp, groups * t
    # A kv head's query heads become extra query positions ([N, kv_heads, g*T, d]), so both parts are 4-D products.
    qh = q.reshape(n, t, hkv, groups, d).transpose(0, 2, 3, 1, 4).reshape(n, hkv, gt, d)
    # [N, kv_heads, g*T, ...] <-> [Bp, kv_heads, R*g*T, ...]: a query's R rows as extra query positions.
    fold = lambda x: x.reshape((bp, r) + x.shape[1:]).swapaxes(1, 2).reshape((bp, hkv, r * gt) + x.shape[3:])
    unfold = lambda x: x.reshape((bp, hkv, r, gt) + x.shape[3:]).swapaxes(1, 2).reshape((n, hkv, gt) + x.shape[3:])
    own = jnp.einsum("bkqd,bksd->bkqs", qh, k).astype(jnp.float32)
    own = jnp.where(jnp.tile(mask, (1, 1, groups, 1)), own, NEG_INF)
    pre = jnp.einsum("bkqd,bksd->bkqs", fold(qh), pk).astype(jnp.float32)
    pre = jnp.where(pmask, pre, NEG_INF)
    top = jnp.maximum(unfold(pre.max(axis=-1)), own.max(axis=-1))           # [N, kv_heads, g*T]
    e_own = jnp.exp(own - top[..., None])
    e_pre = jnp.exp(pre - fold(top)[..., None])
    denom = unfold(e_pre.sum(axis=-1)) + e_own.sum(axis=-1)
    e_own, e_pre = e_own.astype(self.dtype), e_pre.astype(self.dtype)
    if self.dropout_rate > 0.0 and not deterministic:
      e_own = nn.Dropout(self.dropout_rate)(e_own, deterministic=False)
      e_pre = nn.Dropout(self.dropout_rate)(e_pre, deterministic=False)
    out = (jnp.einsum("bkqs,bksd->bkqd", e_own, v).astype(jnp.float32)
           + unfold(jnp.einsum("bkqs,bksd->bkqd", e_pre, pv)).astype(jnp.float32)) / denom[..., None]
    return out.astype(self.dtype).reshape(n, hkv, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(n, t, h, d)

  def _self_cache(self, k, v, mask, token_mask, batch, q_len):
    hkv, d = self.num_kv_heads, self.head_dim
    initialized = self.has_variable("cache", "cached_key")
    shape = (batch, hkv, self.cache_length, d)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    key_mask = self.variable("cache", "key_mask", jnp.zeros, (batch, self.cache_length), jnp.int32)
    cache_index = self.variable("cache", "cache_index", jnp.zeros, (batch,), jnp.int32)
    # A slot not yet written is masked out, so the row it points to does not matter.
    cache_rows = self.variable("cache", "cache_rows", jnp.zeros, (batch, self.cache_length), jnp.int32)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, kv_heads, T, head_dim]
    if not initialized:  # creation call: attend within the given tokens only, per-row cache untouched
      if self.decode_prefix:
        tm = jnp.ones((batch, q_len), jnp.int32) if token_mask is None else token_mask.astype(jnp.int32)
        self.variable("cache", "prefix_key", lambda: k)
        self.variable("cache", "prefix_value", lambda: v)
        self.variable("cache", "prefix_mask", lambda: tm)
        keys_ok = (tm > 0)[:, None, None, :]
        mask = keys_ok if mask is None else mask & keys_ok
      return k, v, mask, None
    index = cache_index.value
    tm = jnp.ones((batch, q_len), jnp.int32) if token_mask is None else token_mask.astype(jnp.int32)
    cached_key.value = _update_rows(cached_key.value, k, index, axis=2)
    cached_value.value = _update_rows(cached_value.value, v, index, axis=2)
    key_mask.value = _update_rows(key_mask.value, tm, index)
    cache_index.value = index + q_len
    r = self.rows_per_query
    if batch % r:
      raise ValueError(f"attention: {batch} rows do not form groups of rows_per_query={r}")
    own = jnp.arange(batch, dtype=jnp.int32) % r
    cache_rows.value = _update_rows(cache_rows.value, jnp.broadcast_to(own[:, None], (batch, q_len)), index)
    slots = jnp.arange(self.cache_length)
    q_slots = index[:, None] + jnp.arange(q_len)[None, :]  # [B, T]
    cache_mask = (slots[None, None, :] <= q_slots[:, :, None]) & (key_mask.value[:, None, :] > 0)
    prefix = None
    if self.has_variable("cache", "prefix_key"):
      kv_axes = ("batch", "kv_heads", "length", "kv")
      prefix = (constrain(self.get_variable("cache", "prefix_key"), kv_axes),
                constrain(self.get_variable("cache", "prefix_value"), kv_axes),
                (self.get_variable("cache", "prefix_mask") > 0)[:, None, None, :])
    keys, values = (_read_rows(x.value, cache_rows.value, r) for x in (cached_key, cached_value))
    return keys, values, cache_mask[:, None], prefix

  def _cross_cache(self, inputs_kv, mask, dense):
    """Projects the encoder output once (creation call) and reuses the projections at every step, stored heads
    first ([B, kv_heads, S, head_dim]: the layout the attention products read, so no step transposes them)."""
    hkv, d = self.num_kv_heads, self.head_dim
    if not self.has_variable("cache", "cross_key"):
      k = dense((hkv, d), ("embed", "kv_heads", "kv"), init_scale=self.init_scale, name="key")(inputs_kv)
      v = dense((hkv, d), ("embed", "kv_heads", "kv"), init_scale=self.init_scale, name="value")(inputs_kv)
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      kv_mask = jnp.broadcast_to(mask, (mask.shape[0], 1, 1, inputs_kv.shape[1]))[:, 0, 0].astype(jnp.int32)
      self.variable("cache", "cross_key", lambda: k)
      self.variable("cache", "cross_value", lambda: v)
      self.variable("cache", "cross_mask", lambda: kv_mask)
    k = self.get_variable("cache", "cross_key")
    v = self.get_variable("cache", "cross_value")
    kv_mask = self.get_variable("cache", "cross_mask")
    return k, v, (kv_mask > 0)[:, None, None, :]


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_new" (T5 v1.1 gated-gelu)
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


class MlpBlock(nn.Module):
  """Feed-forward: product of one projection per activation (gated when >1), then down-projection."""
  d_ff: int
  activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.0
  init_scale: float = 1.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dense = functools.partial(DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype,
                              init_scale=self.init_scale)
    hidden = None
    for i, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      y = ACTIVATIONS[act](dense((self.d_ff,), ("embed", "mlp"), name=name)(x))
      hidden = y if hidden is None else hidden * y
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return dense((x.shape[-1],), ("mlp", "embed"), name="wo")(hidden)


def apply_layers(layer_cls: type[nn.Module], num_layers: int, x: Array, args: tuple, *, scan: bool,
                 remat_policy: str, **attrs) -> Array:
  """Runs `num_layers` layers `layer_cls(**attrs)(x, *args) -> (x, None)` as a loop or a scan.

  Scanned params get a leading `layers` axis; scanned cache leaves are stacked at axis 1 so the batch stays the
  leading axis of every cache leaf (the beam search contract).
  """
  cls = layer_cls
  if remat_policy != "none":
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {remat_policy!r}; one of none, {', '.join(REMAT_POLICIES)}")
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
  if scan:
    stack = nn.scan(cls, variable_axes={"params": 0, "cache": 1}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name="layers", **attrs)(x, *args)
    return x
  for i in range(num_layers):
    x, _ = cls(name=f"layers_{i}", **attrs)(x, *args)
  return x


def segment_mask(q_segments: Array, kv_segments: Array) -> Array:
  """[B, 1, Tq, Tk]: same non-zero segment (packing-aware padding mask)."""
  return ((q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] > 0))[:, None]


def causal_mask(length: int) -> Array:
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def stack_layer_params(tree: Any) -> Any:
  """Converts a loop layout (`layers_0`, `layers_1`, ...) into the `nn.scan` layout (`layers`, leading axis)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: stack_layer_params(v) for k, v in tree.items() if not k.startswith("layers_")}
  indexed = sorted((int(k.split("_")[1]), v) for k, v in tree.items() if k.startswith("layers_"))
  if indexed:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[stack_layer_params(v) for _, v in indexed])
  return out


def unstack_layer_params(tree: Any) -> Any:
  """Inverse of `stack_layer_params`."""
  if not isinstance(tree, dict):
    return tree
  out = {k: unstack_layer_params(v) for k, v in tree.items() if k != "layers"}
  if "layers" in tree:
    n = jax.tree.leaves(tree["layers"])[0].shape[0]
    for i in range(n):
      out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
  return out
