"""The substring constraint over a corpus split into S suffix-array shards (docs/decoding.md, "Sharding
across devices or hosts"): for corpora past one shard's 2^31 - 1 tokens or one device's memory.

The shards are `SubstringConstraint`s over contiguous runs of documents (`SuffixArrayIndex.build_shards`),
padded to one size and stacked: every device array gains a leading shard axis [S, ...], which can be placed
sharded over a mesh axis (`place`). The per-row state is one interval per shard ([N, S] leaves, rows first
as the beam search needs). Every step each shard narrows its own intervals (vmapped over the shard axis, so
sharded arrays stay on their devices) and the allowed sets are combined by a reduction over shards:

* a token is allowed iff it is allowed in some shard (documents never span shards, so an n-gram occurs in
  the corpus iff it occurs in a shard), and its count is the sum of the shard counts;
* the union of per-shard masks is exact for the search: a shard leaves an allowed token masked only when
  at least `num_candidates` of its own allowed candidates score higher, and those are allowed in the union,
  so the token cannot enter the union's top set either;
* the large-interval checks run under one `lax.cond` on "any shard has a large row" (a vmapped cond would
  run both branches every step); their loops run as long as the busiest shard needs;
* sparse steps list each shard's few allowed tokens side by side, duplicates replaced by V;
* placed on a mesh, the mask runs under `shard_map` (`_mask_per_device`): each device masks with its own
  shards and only the allowed sets cross devices.

The results equal the one-shard `SubstringConstraint`'s (tested for several shard counts, placed and not).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from genret_jax.decoding.constraints import NEG_INF
from genret_jax.decoding.substring import SubstringConstraint, SubstringState
from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.errors import InputError


@flax.struct.dataclass
class ShardedSubstringConstraint:
  """S stacked `SubstringConstraint` shards; build with `from_shards` or `from_index`."""

  shards: SubstringConstraint    # every array leaf [S, ...]; the static settings are shared
  # Where `place` put the shard axis (or None): the masks then run per device under `shard_map`, and the
  # vmapped steps name the axis to the partitioner (`spmd_axis_name`), so per-shard work stays on its devices.
  mesh: jax.sharding.Mesh | None = flax.struct.field(pytree_node=False, default=None)
  mesh_axis: str | None = flax.struct.field(pytree_node=False, default=None)
  truncated_is_valid: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def from_shards(cls, indexes: Sequence[SuffixArrayIndex], *, vocab_size: int, eos_id: int, capacity: int = 0,
                  **kw) -> "ShardedSubstringConstraint":
    """Device arrays for the shard indexes (one separator id), padded to one text size; `kw` are
    `SubstringConstraint.from_index`'s settings, the same for every shard."""
    if not indexes:
      raise InputError("a sharded substring constraint needs at least one shard", key="index_shards")
    seps = {ix.sep_id for ix in indexes}
    if len(seps) > 1:
      raise InputError(f"the shards use different separator ids {sorted(seps)}", key="suffix_array.sep_id")
    capacity = max([capacity] + [ix.num_tokens + 1 for ix in indexes])
    parts = [SubstringConstraint.from_index(ix, vocab_size=vocab_size, eos_id=eos_id, capacity=capacity, **kw)
             for ix in indexes]
    # One static search depth (enough for the most frequent token of any shard) and one token dtype, so
    # that the shards stack into one pytree.
    rounds = max(p.search_rounds for p in parts)
    dtype = jnp.result_type(*(p.text.dtype for p in parts))
    parts = [p.replace(search_rounds=rounds, text=p.text.astype(dtype)) for p in parts]
    return cls(shards=jax.tree.map(lambda *xs: jnp.stack(xs), *parts))

  @classmethod
  def from_index(cls, index: SuffixArrayIndex, num_shards: int, *, vocab_size: int, eos_id: int,
                 **kw) -> "ShardedSubstringConstraint":
    """Splits a host index's documents into `num_shards` runs of about equal size (`SuffixArrayIndex.split`)."""
    return cls.from_shards(index.split(num_shards), vocab_size=vocab_size, eos_id=eos_id, **kw)

  def place(self, mesh: jax.sharding.Mesh, axis: str = "model") -> "ShardedSubstringConstraint":
    """The shard axis over mesh `axis` (every device keeps S / size shards), or replicated when the axis is
    absent or does not divide S."""
    size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(axis, 1)
    sharded = size > 1 and self.num_shards % size == 0
    spec = jax.sharding.PartitionSpec(axis) if sharded else jax.sharding.PartitionSpec()
    return jax.device_put(self.replace(mesh=mesh if sharded else None, mesh_axis=axis if sharded else None),
                          jax.sharding.NamedSharding(mesh, spec))

  @property
  def num_shards(self) -> int:
    return int(self.shards.num_suffixes.shape[0])

  @property
  def nbytes(self) -> int:
    return self.shards.nbytes

  def _over_shards(self, fn, in_axes=(0, 1), out_axes=0):
    """vmap over the shard axis: of the stacked constraint (axis 0) and of its [N, S] state (axis 1)."""
    return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, spmd_axis_name=self.mesh_axis)

  # --- protocol -----------------------------------------------------------------------------------

  def init_state(self, num_rows: int) -> SubstringState:
    return self._over_shards(lambda c: c.init_state(num_rows), in_axes=0, out_axes=1)(self.shards)

  def advance(self, state: SubstringState, tokens: jax.Array) -> SubstringState:
    return self._over_shards(lambda c, s: c.advance(s, tokens), out_axes=1)(self.shards, state)

  def count(self, state: SubstringState) -> jax.Array:
    return self._over_shards(lambda c, s: c.count(s), out_axes=1)(self.shards, state).sum(axis=1)

  def sparse_allowed(self, state, beam_scores):
    tokens, usable = self._over_shards(lambda c, s: c.sparse_allowed(s, beam_scores), out_axes=(1, 0))(
        self.shards, state)                                   # [N, S, W], [S]
    v = self.shards.vocab_size
    tokens = jnp.sort(tokens.reshape(tokens.shape[0], -1), axis=1)
    repeat = jnp.concatenate([jnp.zeros_like(tokens[:, :1], bool), tokens[:, 1:] == tokens[:, :-1]], axis=1)
    return jnp.where(repeat, v, tokens), jnp.all(usable)

  def mask_log_probs(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    if self.mesh is not None:
      return self._mask_per_device(state, log_probs, beam_scores, num_beams=num_beams,
                                   num_candidates=num_candidates)
    masked, large, eos_lp = self._over_shards(lambda c, s: c.exact_rows_mask(s, log_probs, beam_scores))(
        self.shards, state)                                   # [S, N, V], [S, N], [S, N]

    def check(masked):
      one = lambda c, s, m, lg, e: c.check_large(s, log_probs, beam_scores, m, lg, e, num_beams=num_beams,
                                                 num_candidates=num_candidates)
      return self._over_shards(one, in_axes=(0, 1, 0, 0, 0))(self.shards, state, masked, large, eos_lp)

    masked = jax.lax.cond(jnp.any(large), check, lambda m: m, masked)
    return jnp.where(jnp.any(masked > NEG_INF / 2, axis=0), log_probs, NEG_INF)

  def _mask_per_device(self, state, log_probs, beam_scores, *, num_beams, num_candidates):
    """`mask_log_probs` under `shard_map`: each device masks its rows with its own shards (the one-device code
    path, nothing crosses devices inside it), then one max over the shard axis combines the allowed sets. Left
    to the partitioner, the large-row checks' top-k operand was all-gathered over the shard axis (session 13,
    8-device compile). Rows are split over the mesh's batch axes only in whole queries (a query's beams share
    one threshold); otherwise every device takes all rows."""
    P = jax.sharding.PartitionSpec
    sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1 and a != self.mesh_axis)
    split = 1
    for a in batch_axes:
      split *= sizes[a]
    rows = batch_axes if batch_axes and (log_probs.shape[0] // num_beams) % split == 0 else None
    local = self.replace(mesh=None, mesh_axis=None)

    def body(shards, state, log_probs, beam_scores):
      masked = local.replace(shards=shards).mask_log_probs(state, log_probs, beam_scores, num_beams=num_beams,
                                                            num_candidates=num_candidates)
      allowed = jax.lax.pmax((masked > NEG_INF / 2).astype(jnp.int8), self.mesh_axis) > 0
      return jnp.where(allowed, log_probs, NEG_INF)

    shard_spec = jax.tree.map(lambda _: P(self.mesh_axis), self.shards)
    state_spec = jax.tree.map(lambda _: P(rows, self.mesh_axis), state)
    return jax.shard_map(body, mesh=self.mesh, in_specs=(shard_spec, state_spec, P(rows, None), P(rows)),
                         out_specs=P(rows, None), check_vma=False)(self.shards, state, log_probs, beam_scores)
