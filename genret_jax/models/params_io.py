"""The one on-disk format for model parameters: `<dir>/params` (an orbax StandardCheckpointer tree of the unboxed
params) next to `<dir>/model.gin` (the gin model config that built them).

`convert-hf` writes it, the trainer writes it at the end of a run (LoRA merged), and everything that loads a
model for inference (`retrieve`, `cgl`, `sweep`) reads it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from genret_jax.errors import InputError

PARAMS_SUBDIR = "params"
MODEL_GIN = "model.gin"


def save_params(directory: str, params: Any, model_gin: str | None = None, overwrite: bool = True) -> str:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, PARAMS_SUBDIR)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=overwrite)
    ckptr.wait_until_finished()
  if model_gin is not None:
    with open(os.path.join(directory, MODEL_GIN), "w") as f:
      f.write(model_gin)
  return path


def params_fingerprint(directory: str) -> str:
  """Identifies one save of `<dir>/params` without reading the arrays: orbax's checkpoint metadata carries the
  save's commit timestamp (and travels with a copied directory); without it, the files' names and sizes."""
  path = os.path.join(os.path.abspath(directory), PARAMS_SUBDIR)
  h = hashlib.sha256()
  meta = os.path.join(path, "_CHECKPOINT_METADATA")
  if os.path.isfile(meta):
    with open(meta, "rb") as f:
      h.update(f.read())
  else:
    for root, _, files in sorted(os.walk(path)):
      for name in sorted(files):
        h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{os.path.getsize(os.path.join(root, name))}\n"
                 .encode())
  return h.hexdigest()[:16]


def has_params(directory: str) -> bool:
  return os.path.isdir(os.path.join(os.path.abspath(directory), PARAMS_SUBDIR))


def restore_params(directory: str, abstract_params: Any | None = None) -> Any:
  """Restores params; with `abstract_params` (ShapeDtypeStructs with shardings) directly into those shardings."""
  path = os.path.join(os.path.abspath(directory), PARAMS_SUBDIR)
  if not os.path.isdir(path):
    raise InputError(f"no parameter checkpoint at {path} (expected the output of `genret train` or "
                     f"`genret convert-hf`)", path=directory)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    # convert-hf before session 16 saved {"params": tree}; a model's own top-level names are its modules.
    wrapped = isinstance(tree, dict) and list(tree) == ["params"]
    if abstract_params is None:
      # Onto this process's first device, whatever mesh wrote it (e.g. a multi-host run): orbax refuses to
      # reuse saved shardings whose devices are not here.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                     tree["params"] if wrapped else tree)
    if wrapped:
      return ckptr.restore(path, {"params": abstract_params})["params"]
    return ckptr.restore(path, abstract_params)


def abstract_with_shardings(model, mesh, batch_shapes=None) -> Any:
  """Unboxed ShapeDtypeStructs of `model`'s params carrying their mesh shardings (restore target)."""
  import flax.linen as nn

  from genret_jax.models import partitioning
  boxed = model.abstract_params(batch_shapes)
  # nn.meta.unbox would apply sharding constraints eagerly and fails on ShapeDtypeStructs (STACK.md trap 3).
  shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  shardings = partitioning.param_shardings(boxed, mesh, model.rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
