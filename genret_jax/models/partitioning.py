"""The one table mapping logical axis names to mesh axes, and the mesh builder.

Every parameter and key activation of both model families carries logical axis names (`vocab`, `embed`, `mlp`,
`heads`, `kv_heads`, `kv`, `layers`, `batch`, `length`, ...). `LOGICAL_AXIS_RULES` maps them onto a 3-axis mesh:

* `data`  - pure data parallelism (parameters replicated),
* `fsdp`  - data parallelism whose devices also shard parameters along `embed` (ZeRO-3 style),
* `model` - tensor parallelism over `vocab`, `mlp`, `heads`, `kv_heads`.

Rules are in priority order and a mesh axis is used at most once per array (flax semantics), so an activation
`('batch', 'length', 'embed')` puts `batch` on `('data', 'fsdp')` and leaves `embed` replicated, while the
parameter `('embed', 'mlp')` puts `embed` on `fsdp` and `mlp` on `model`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from genret_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "model")

LogicalRules = tuple[tuple[str, Any], ...]

LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("relpos_buckets", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, model) mesh with Auto axis types; one size may be -1 (= all remaining devices).

  Auto axis types are required: with jax 0.10's default Explicit axes, Linen's logical constraints assert.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, model]
  if sum(s == -1 for s in sizes) > 1:
    raise InputError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} model={model}",
                     key="mesh")
  if any(s == 0 or s < -1 for s in sizes):
    raise InputError(f"mesh axis sizes must be positive or -1, got {sizes}", key="mesh")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise InputError(f"{len(devices)} devices are not divisible by the fixed mesh axes {sizes}", key="mesh")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    shape = dict(zip(MESH_AXES, sizes))
    if math.prod(sizes) > len(devices):
      raise InputError(f"mesh {shape} needs {math.prod(sizes)} devices, have {len(devices)}", key="mesh")
    # A multi-host job whose mesh leaves out a host's devices fails far from here (that host holds no shard of
    # the arrays it is asked to read, or waits forever in a collective the others never join).
    if jax.process_count() > 1:
      raise InputError(f"mesh {shape} uses {math.prod(sizes)} of the job's {len(devices)} devices; a multi-host "
                       "mesh must use every device (set one axis to -1)", key="mesh")
    logging.warning("mesh %s uses %d of %d devices", shape, math.prod(sizes), len(devices))
    devices = devices[:math.prod(sizes)]
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_mesh_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                         mesh: jax.sharding.Mesh | None = None,
                         rules: LogicalRules = LOGICAL_AXIS_RULES) -> P:
  """Mesh PartitionSpec for logical `axes`; with `shape` and `mesh`, dims that do not divide are replicated.

  Dropping indivisible assignments (e.g. 1 KV head on a 2-way `model` axis) keeps odd configs runnable
  instead of failing at placement time.
  """
  spec = list(nn.logical_to_mesh_axes(tuple(axes), rules))
  if shape is not None and mesh is not None:
    for i, (dim, assignment) in enumerate(zip(shape, spec)):
      if assignment is None:
        continue
      names = assignment if isinstance(assignment, tuple) else (assignment,)
      if dim % math.prod(mesh.shape[n] for n in names):
        spec[i] = None
  return P(*spec)


def param_partition_specs(boxed_params: Any, mesh: jax.sharding.Mesh | None = None,
                          rules: LogicalRules = LOGICAL_AXIS_RULES) -> Any:
  """PartitionSpecs for a tree of (possibly abstract) `nn.LogicallyPartitioned` params; unboxed leaves -> P()."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh, rules)
    return P()

  return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh,
                    rules: LogicalRules = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree of boxed params (as returned by `Model.abstract_params`)."""
  specs = param_partition_specs(boxed_params, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def logical_axes(boxed_params: Any) -> Any:
  """The logical axis names of every boxed param (tuple per leaf)."""
  return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else (),
                      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def process_batch_slice(mesh: jax.sharding.Mesh, batch_size: int) -> tuple[int, int]:
  """(index, count): this process feeds rows [index * B / count, (index + 1) * B / count) of a global batch of B
  rows laid out by `batch_sharding`.

  `count` is the number of distinct row blocks the processes hold, not the process count: when the `data` and
  `fsdp` axes do not span every host (a `model` axis across hosts), several processes hold the same rows and must
  read the same data (t5x's data layout does the same)."""
  data = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % data:
    raise InputError(f"BATCH_SIZE {batch_size} is not divisible by the mesh's data x fsdp = {data} devices",
                     key="BATCH_SIZE")
  rows: dict[int, set[tuple[int, int]]] = {}
  for device, index in batch_sharding(mesh, 1).devices_indices_map((batch_size,)).items():
    start, stop, _ = index[0].indices(batch_size)
    rows.setdefault(device.process_index, set()).add((start, stop))
  spans = {}
  for process, blocks in rows.items():
    lo, hi = min(b[0] for b in blocks), max(b[1] for b in blocks)
    if sum(b[1] - b[0] for b in blocks) != hi - lo:
      raise InputError(f"process {process}'s devices hold rows that are not one contiguous block of the batch "
                       f"({sorted(blocks)}); order the mesh's devices by host", key="mesh")
    spans[process] = (lo, hi)
  distinct = sorted(set(spans.values()))
  if len({hi - lo for lo, hi in distinct}) != 1 or distinct[0][0] != 0 or any(
      a[1] != b[0] for a, b in zip(distinct, distinct[1:])):
    raise InputError(f"the processes' row blocks {distinct} do not split the batch evenly", key="mesh")
  if jax.process_index() not in spans:
    raise InputError(f"process {jax.process_index()} holds none of the mesh's devices", key="mesh")
  return distinct.index(spans[jax.process_index()]), len(distinct)


def describe_shardings(boxed_params: Any, mesh: jax.sharding.Mesh | None = None) -> list[tuple[str, tuple, tuple, str]]:
  """(path, shape, logical axes, mesh spec) per param, for `genret model-info`."""
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if isinstance(leaf, nn.LogicallyPartitioned):
      shape, names = tuple(leaf.value.shape), tuple(leaf.names)
      spec = logical_to_mesh_spec(names, shape, mesh)
    else:
      shape, names, spec = tuple(np.shape(leaf)), (), P()
    rows.append((name, shape, names, str(spec)))
  return rows
