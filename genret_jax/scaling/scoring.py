"""Batched, jitted teacher-forced scoring of many (input, target) token sequences: the model side of CGL.

`PairScorer(model, params, mesh=...).score(inputs, targets)` returns, per pair, the summed target NLL and the
number of scored target tokens. Everything runs through one jitted function per (input length bucket, target
length bucket) over fixed-shape batches:

* pairs are bucketed by length (bucket edges grow by ~1.5x), so padding stays small and the number of
  compilations is a handful; the last batch of a bucket is filled with all-zero rows;
* only target positions of real tokens carry loss weight, so padding (columns or whole rows) is never counted:
  a pair scored alone and inside a padded batch gives the same NLL;
* batches are placed with `partitioning.batch_sharding`, i.e. split over the mesh's (data, fsdp) axes, and the
  parameters keep their own shardings;
* on several processes (jax.distributed, a mesh over every host's devices) each process builds every batch from
  its own copy of the pairs, which are compared by hash first, hands over the rows of its devices, and gets every
  pair's NLL back (all-gathered), so `score` returns the same on every process.

Shared inputs (`share_inputs=True`, the default). CGL scores every query against ~257 documents x ~10 spans,
so the same input recurs thousands of times. Rather than re-running the input through the model for each
target, a batch holds `inputs_per_batch` slots of R = batch_size / inputs_per_batch target rows each; a slot's
rows all continue one input (an input with more than R targets takes several slots). Each slot's input runs once
through `decode_init` (T5: encoded, cross-attention keys/values projected; LLaMA: the prompt prefilled into the
per-query prefix cache), the per-row cache is repeated R times, and `continuation_stats` scores all of a row's target
tokens in one multi-token step. T5's projected encoder keys/values and LLaMA's prompt keys/values stay one row per
slot: attention folds the slot's R rows into its query axis (as beam search folds beams), so they are neither
repeated nor gathered.
Both give the same numbers as the plain path (feature-converter batches through `score_batch`), which remains
available (`share_inputs=False`) and is what tests compare against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genret_jax import multihost
from genret_jax.errors import InputError
from genret_jax.models import model_api, partitioning

Array = jax.Array

DEFAULT_BATCH_SIZE = 256
_GATHER_GROUP = 64    # batch outputs fetched per all-gather on several processes


def default_length_buckets(max_length: int) -> list[int]:
  """8, 16, 24, 32, 48, 64, 96, 128, 192, ... up to (and including a bucket >=) `max_length`."""
  edges, base = [8], 8
  while edges[-1] < max_length:
    base_next = base * 2
    mid = base + base // 2
    for e in (mid, base_next):
      if e > edges[-1]:
        edges.append(e)
    base = base_next
  return edges


def bucket_length(length: int, edges: Sequence[int]) -> int:
  for e in edges:
    if length <= e:
      return int(e)
  # Longer than every edge: round up to a multiple of the largest edge's step so shapes still repeat.
  step = max(8, edges[-1] // 2)
  return int(math.ceil(length / step) * step)


@dataclasses.dataclass(frozen=True)
class ScoredPairs:
  """Per pair (input order): summed negative log-likelihood of the target tokens, and their count."""

  nll: np.ndarray         # [N] float64
  num_tokens: np.ndarray  # [N] int64
  stats: dict

  @property
  def mean_nll(self) -> np.ndarray:
    return self.nll / np.maximum(self.num_tokens, 1)


def _shift_right(targets: np.ndarray) -> np.ndarray:
  out = np.zeros_like(targets)
  out[:, 1:] = targets[:, :-1]
  return out


# ------------------------------------------------------------------------------------------------------------
# The jitted scoring functions (one per family and mode). Each returns the summed NLL per target row.


def plain_nll_fn(model: model_api.BaseModel) -> Callable:
  """(params, batch) -> [B] summed NLL through the model's own `score_batch` (feature-converter batch)."""

  def fn(params, batch):
    total, _ = model.score_batch(params, batch)
    return -total

  return fn


def shared_nll_fn(model: model_api.BaseModel) -> Callable:
  """(params, inputs [K, Lin], targets [K * R, Lt]) -> [K * R] summed NLL; rows j*R .. j*R+R-1 continue input j,
  which runs through the model once."""

  def fn(params, inputs, targets):
    rows, target_len = targets.shape
    per_slot = rows // inputs.shape[0]
    cache, first = model.decode_init(params, inputs, target_len)
    repeat = lambda x: jnp.repeat(x, per_slot, axis=0)
    # Every per-row part repeated (the per-query part stays one row per slot).
    cache = {**cache, **{part: jax.tree.map(repeat, cache[part]) for part in cache if part != "per_query"}}
    tokens = jnp.concatenate([repeat(first)[:, None], targets[:, :-1]], axis=1)
    stats = model.continuation_stats(params, cache, tokens, targets)
    return -jnp.sum(stats.log_prob * (targets > 0), axis=-1)

  return fn


# ------------------------------------------------------------------------------------------------------------
# Host-side batching


def _pairs_digest(prepared: tuple[list[np.ndarray], list[np.ndarray], np.ndarray]) -> bytes:
  ins, tgts, index = prepared
  h = hashlib.sha256()
  for arrays in (ins, tgts):
    h.update(np.array([a.size for a in arrays], np.int64).tobytes())
    if arrays:
      h.update(np.concatenate(arrays).tobytes())
  h.update(np.ascontiguousarray(index, np.int64).tobytes())
  return h.digest()


def _as_int_lists(seqs: Sequence[Sequence[int]], what: str) -> list[np.ndarray]:
  """Token id arrays. Id 0 is padding: a vocabulary that maps a piece (e.g. <unk>) to 0 gets it masked, exactly
  as the seqio feature converters and the models do in training, and it is not counted."""
  out = []
  for i, s in enumerate(seqs):
    a = np.asarray(s, dtype=np.int32).reshape(-1)
    if a.size == 0 or not np.any(a > 0):
      raise InputError(f"{what} {i} is empty (an EOS-terminated token list is expected)", key=what)
    if np.any(a < 0):
      raise InputError(f"{what} {i} contains a negative id", key=what)
    out.append(a)
  return out


def _pad_rows(rows: Sequence[np.ndarray], num_rows: int, length: int) -> np.ndarray:
  out = np.zeros((num_rows, length), np.int32)
  for i, r in enumerate(rows):
    out[i, :r.size] = r
  return out


def place_params(model: model_api.BaseModel, params: Any, mesh: jax.sharding.Mesh) -> Any:
  """Params put into the model's logical shardings on `mesh` (a no-op for params already placed so)."""
  shardings = model.param_shardings(mesh)
  return jax.device_put(params, shardings)


def _merge_small_groups(groups: dict[tuple[int, int], list[int]], batch_size: int,
                        index: np.ndarray) -> dict[tuple[int, int], list[int]]:
  """Buckets holding less than one batch are folded into one bucket padded to their largest lengths.

  Each bucket shape is one XLA compilation (seconds), while a part-filled batch pays for its padding anyway;
  for small jobs (a few queries) the compilations dominate, for large ones every bucket is full and kept.
  """
  small = [key for key, rows in groups.items() if len(rows) < batch_size]
  if len(small) < 2:
    return groups
  merged_key = (max(k[0] for k in small), max(k[1] for k in small))
  out = {key: rows for key, rows in groups.items() if key not in small}
  merged = out.setdefault(merged_key, [])
  for key in small:
    merged.extend(groups[key])
  # Rows of one input stay together (shared mode packs a batch by input), as in `_bucketed`.
  merged.sort(key=lambda row: (int(index[row]), row))
  return out


def choose_slot_rows(targets_per_input: np.ndarray, target_len: float, input_len: float,
                     per_device_batch: int) -> int:
  """Rows per input slot R (a divisor of the per-device batch) that minimises the tokens a shared-mode pass runs:
  the targets' rows including each input's part-filled last slot, plus one input per slot. Many targets per input
  (CGL: ~2,570 spans per query) favour large slots, few favour small ones; ties go to the larger slot."""
  counts = np.asarray(targets_per_input, np.int64)
  counts = counts[counts > 0]
  best, best_cost = 1, None
  for r in range(1, per_device_batch + 1):
    if per_device_batch % r:
      continue
    slots = int(np.sum(-(-counts // r)))
    cost = slots * (r * target_len + input_len)
    if best_cost is None or cost <= best_cost:
      best, best_cost = r, cost
  return best


class PairScorer:
  """Scores (input, target) token sequences with one model; see the module docstring.

  Args:
    model: an `EncoderDecoderModel` or `DecoderOnlyModel`.
    params: its params (placed on `mesh` by the caller, e.g. restored with `params_io`, or via `place_params`).
    mesh: the device mesh; batches are sharded over its (data, fsdp) axes. Default: all devices on `data`.
    batch_size: target rows per forward pass (rounded up to a multiple of the batch shards).
    inputs_per_batch: input slots per batch in shared mode (a multiple of the batch shards); each slot holds
      batch_size / inputs_per_batch target rows of one input (batch_size is rounded up to a multiple). Default:
      chosen per `score` call from the data (`choose_slot_rows`): few large slots for inputs with many targets
      (CGL n-gram: ~2,570 per query), many small ones for inputs with few.
    share_inputs: run each distinct input once per batch (encode-once / prefix caching) instead of once per pair.
    length_buckets: bucket edges for input and target lengths (default `default_length_buckets`).
  """

  def __init__(self, model: model_api.BaseModel, params: Any, *, mesh: jax.sharding.Mesh | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, inputs_per_batch: int | None = None,
               share_inputs: bool = True, length_buckets: Sequence[int] | None = None):
    if batch_size < 1:
      raise InputError(f"batch size must be positive, got {batch_size}", key="BATCH_SIZE")
    self.model = model
    self.params = params
    self.mesh = mesh if mesh is not None else partitioning.make_mesh(data=-1)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.shards = shards
    if inputs_per_batch is None:   # slots sized per call; every divisor of the per-device batch is a choice
      self.inputs_per_batch = self.slot_rows = None
      self.batch_size = int(math.ceil(batch_size / shards) * shards)
    else:
      self.inputs_per_batch = int(math.ceil(max(1, min(inputs_per_batch, batch_size)) / shards) * shards)
      # Shared mode: whole slots per batch (hence whole slots per device); plain mode: whole rows per device.
      multiple = self.inputs_per_batch if share_inputs else shards
      self.batch_size = int(math.ceil(batch_size / multiple) * multiple)
      self.slot_rows = self.batch_size // self.inputs_per_batch
    self.share_inputs = share_inputs
    self.length_buckets = list(length_buckets) if length_buckets else None
    self._plain = jax.jit(plain_nll_fn(model))
    self._shared = jax.jit(shared_nll_fn(model)) if share_inputs else None

  # ---- public ---------------------------------------------------------------------------------------

  def score(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
            input_index: Sequence[int] | None = None,
            progress: Callable[[int, int], None] | None = None) -> ScoredPairs:
    """Scores target i given input `input_index[i]` (or `inputs[i]` when `input_index` is None).

    Token lists are EOS-terminated ids without padding (what the seqio task's tokenizer gives).
    """
    # Every process builds every global batch from its own copy of the pairs and hands over its devices' rows
    # (`_place`), so a host whose pairs differ (another GENRET_CACHE, say) would silently mix two jobs' rows, or
    # run another number of batches and leave the others waiting: the pairs are compared first.
    ins, tgts, index = multihost.agree(
        lambda: self._prepare(inputs, targets, input_index), _pairs_digest, what="preparing the pairs to score",
        differ="hold other (input, target) pairs to score than process 0: give every host the same flags, gin "
               "files and GENRET_CACHE")
    n = len(tgts)
    num_tokens = np.array([np.count_nonzero(t) for t in tgts], np.int64)
    nll = np.zeros(n, np.float64)
    if n == 0:
      return ScoredPairs(nll, num_tokens, {"num_pairs": 0, "num_batches": 0})
    t0 = time.perf_counter()
    slot_rows = None
    if self.share_inputs:
      slot_rows = self.slot_rows or choose_slot_rows(
          np.bincount(index, minlength=len(ins)), float(np.mean([t.size for t in tgts])),
          float(np.mean([a.size for a in ins])), self.batch_size // self.shards)
    batches = (self._shared_batches(ins, tgts, index, slot_rows) if self.share_inputs
               else self._plain_batches(ins, tgts, index))
    pending, shapes, real_tokens, padded_tokens, num_batches = [], set(), 0, 0, 0
    total_batches = len(batches)
    with jax.set_mesh(self.mesh):
      for rows, slots, args in batches:
        shapes.add(tuple(a.shape for a in jax.tree.leaves(args)))
        out = self._run(args)
        pending.append((rows, slots, out))
        num_batches += 1
        if progress is not None:
          progress(num_batches, total_batches)
      fetched = self._fetch([out for _, _, out in pending])
      for (rows, slots, _), values in zip(pending, fetched):
        nll[rows] = np.asarray(values, np.float64)[slots]
    for _, _, args in batches:
      tgt_arr = args["targets"] if "targets" in args else args["decoder_target_tokens"]
      padded_tokens += tgt_arr.size
    real_tokens = int(num_tokens.sum())
    stats = {"num_pairs": n, "num_inputs": len(ins), "num_batches": num_batches,
             "num_shapes": len(shapes), "target_tokens": real_tokens,
             "target_padding_fraction": 1.0 - real_tokens / max(padded_tokens, 1),
             "seconds": time.perf_counter() - t0, "share_inputs": self.share_inputs, "slot_rows": slot_rows}
    return ScoredPairs(nll, num_tokens, stats)

  def _prepare(self, inputs, targets, input_index) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(distinct inputs, targets, per target its input's index), checked."""
    tgts = _as_int_lists(targets, "targets")
    if input_index is None:
      if len(inputs) != len(tgts):
        raise InputError(f"{len(inputs)} inputs for {len(tgts)} targets", key="inputs")
      uniq: dict[tuple, int] = {}
      index = np.empty(len(tgts), np.int64)
      unique_inputs = []
      for i, s in enumerate(inputs):
        key = tuple(int(t) for t in s)
        if key not in uniq:
          uniq[key] = len(unique_inputs)
          unique_inputs.append(s)
        index[i] = uniq[key]
      ins = _as_int_lists(unique_inputs, "inputs")
    else:
      ins = _as_int_lists(inputs, "inputs")
      index = np.asarray(input_index, np.int64).reshape(-1)
      if index.size != len(tgts) or (index.size and (index.min() < 0 or index.max() >= len(ins))):
        raise InputError("input_index must give, per target, an index into inputs", key="input_index")
    if self.share_inputs and isinstance(self.model, model_api.DecoderOnlyModel):
      for i, a in enumerate(ins):
        if np.any(a == 0):
          raise InputError(f"input {i} holds id 0 (padding) inside the prompt; the prefix cache needs "
                           "contiguous prompts (use share_inputs=False)", key="inputs")
    return ins, tgts, index

  # ---- internals --------------------------------------------------------------------------------------

  def _edges(self, max_len: int) -> list[int]:
    return self.length_buckets or default_length_buckets(max_len)

  def _place(self, arr: np.ndarray) -> Array:
    # Each process holds the whole global batch (its pairs were compared in `score`).
    return multihost.place_global(arr, partitioning.batch_sharding(self.mesh, arr.ndim))

  def _fetch(self, outs: list[Array]) -> list[np.ndarray]:
    if jax.process_count() == 1:
      return jax.device_get(outs)
    # The rows of an output lie on every host's devices (device_get refuses them). Every batch's output is
    # [batch_size]: one all-gather per group of batches, not per batch (a CGL split runs tens of thousands).
    fetched = []
    for s in range(0, len(outs), _GATHER_GROUP):
      fetched.extend(multihost.host_array(jnp.stack(outs[s:s + _GATHER_GROUP])))
    return fetched

  def _run(self, args: dict[str, np.ndarray]) -> Array:
    placed = {k: self._place(v) for k, v in args.items()}
    if self.share_inputs:
      return self._shared(self.params, placed["inputs"], placed["targets"])
    return self._plain(self.params, placed)

  def _bucketed(self, ins, tgts, index):
    in_edges = self._edges(max(a.size for a in ins))
    tgt_edges = self._edges(max(a.size for a in tgts))
    if self.share_inputs:
      # Each distinct input runs once per batch, so its padding is cheap next to the targets': one input length
      # (the longest) instead of one compilation per input bucket.
      in_len = np.full(len(index), bucket_length(max(a.size for a in ins), in_edges))
    else:
      in_len = np.array([bucket_length(ins[i].size, in_edges) for i in index])
    tgt_len = np.array([bucket_length(t.size, tgt_edges) for t in tgts])
    groups: dict[tuple[int, int], list[int]] = {}
    # Stable order by input, so rows of one input stay together in shared mode.
    for row in np.lexsort((np.arange(len(tgts)), index)):
      groups.setdefault((int(in_len[row]), int(tgt_len[row])), []).append(int(row))
    return _merge_small_groups(groups, self.batch_size, index)

  def _plain_batches(self, ins, tgts, index):
    family_encdec = isinstance(self.model, model_api.EncoderDecoderModel)
    out = []
    for (lin, lt), rows in sorted(self._bucketed(ins, tgts, index).items()):
      for s in range(0, len(rows), self.batch_size):
        chunk = np.asarray(rows[s:s + self.batch_size], np.int64)
        b = self.batch_size
        if family_encdec:
          targets = _pad_rows([tgts[r] for r in chunk], b, lt)
          args = {"encoder_input_tokens": _pad_rows([ins[index[r]] for r in chunk], b, lin),
                  "decoder_input_tokens": _shift_right(targets), "decoder_target_tokens": targets,
                  "decoder_loss_weights": (targets > 0).astype(np.int32)}
        else:  # prefix-LM: [inputs, targets] in one row, loss on the target part only
          seq = np.zeros((b, lin + lt), np.int32)
          weights = np.zeros((b, lin + lt), np.int32)
          for i, r in enumerate(chunk):
            a, t = ins[index[r]], tgts[r]
            seq[i, :a.size] = a
            seq[i, a.size:a.size + t.size] = t
            weights[i, a.size:a.size + t.size] = t > 0
          args = {"decoder_input_tokens": _shift_right(seq), "decoder_target_tokens": seq,
                  "decoder_loss_weights": weights}
        out.append((chunk, np.arange(chunk.size), args))
    return out

  def _shared_batches(self, ins, tgts, index, slot_rows: int):
    """(pair rows, their batch rows, args) per batch: K input slots x R target rows, a slot's rows continuing one
    input; padding rows have all-zero targets (no weight), padding slots all-zero inputs."""
    out = []
    b, r = self.batch_size, slot_rows
    k = b // r
    for (lin, lt), rows in sorted(self._bucketed(ins, tgts, index).items()):
      slots = []   # (input, up to R pair rows); rows arrive grouped by input
      for src, group in itertools.groupby(rows, key=lambda row: int(index[row])):
        group = list(group)
        slots += [(src, group[s:s + r]) for s in range(0, len(group), r)]
      for first in range(0, len(slots), k):
        batch_slots = slots[first:first + k]
        targets = np.zeros((b, lt), np.int32)
        chunk, places = [], []
        for j, (_, group) in enumerate(batch_slots):
          for i, row in enumerate(group):
            targets[j * r + i, :tgts[row].size] = tgts[row]
          chunk += group
          places += range(j * r, j * r + len(group))
        args = {"inputs": _pad_rows([ins[src] for src, _ in batch_slots], k, lin), "targets": targets}
        out.append((np.asarray(chunk, np.int64), np.asarray(places, np.int64), args))
    return out
