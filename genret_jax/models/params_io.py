"""The one on-disk format for model parameters: `<dir>/params` (an orbax StandardCheckpointer tree of the unboxed
params) next to `<dir>/model.gin` (the gin model config that built them).

`convert-hf` writes it, the trainer writes it at the end of a run (LoRA merged), and everything that loads a
model for inference (`retrieve`, `cgl`, `sweep`) reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from genret_jax import atomic_files, filesystem
from genret_jax.errors import InputError

PARAMS_SUBDIR = "params"
MODEL_GIN = "model.gin"
VOCABULARY_JSON = "vocabulary.json"


def save_params(directory: str, params: Any, model_gin: str | None = None, overwrite: bool = True) -> str:
  directory = filesystem.abspath(directory)
  filesystem.makedirs(directory)
  path = os.path.join(directory, PARAMS_SUBDIR)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=overwrite)
    ckptr.wait_until_finished()
  if model_gin is not None:
    atomic_files.write_text(os.path.join(directory, MODEL_GIN), model_gin)
  return path


def vocabulary_record(vocabulary) -> dict:
  """What identifies a seqio vocabulary: its class, size and, for SentencePiece, a hash of the model proto."""
  record = {"class": type(vocabulary).__name__, "vocab_size": int(vocabulary.vocab_size)}
  sp_model = getattr(vocabulary, "sp_model", None)
  if sp_model is not None:
    record["sha256"] = hashlib.sha256(sp_model).hexdigest()[:16]
  return record


def save_vocabulary_record(directory: str, task_name: str, vocabulary) -> None:
  """Records next to the params the target vocabulary they were trained with (`check_vocabulary` reads it)."""
  atomic_files.write_json(os.path.join(filesystem.abspath(directory), VOCABULARY_JSON),
                          {"task": task_name, "targets": vocabulary_record(vocabulary)}, indent=1)


def check_vocabulary(directory: str, vocabulary) -> None:
  """Refuses params trained with another vocabulary than the task's now. A task's vocabulary is rebuilt when its
  corpus or settings change (the artefacts are keyed by the collection's fingerprint), and the old params ran on
  the new token ids without a word. Params without a record (convert-hf, runs before it existed) pass."""
  path = os.path.join(filesystem.abspath(directory), VOCABULARY_JSON)
  if not filesystem.isfile(path):
    return
  try:
    with filesystem.open(path) as f:
      stored = json.load(f)
    trained = stored["targets"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"unreadable vocabulary record ({e})", path=path) from e
  now = vocabulary_record(vocabulary)
  if trained != now:
    raise InputError(f"these params were trained on task {stored.get('task')!r} with the vocabulary {trained}, "
                     f"the task's vocabulary is now {now}: its corpus or vocabulary settings changed since "
                     "training, so the token ids no longer mean what the model learned (retrain, or point the "
                     "task at the collection it was trained on)", path=path)


def params_fingerprint(directory: str) -> str:
  """Identifies one save of `<dir>/params` without reading the arrays: orbax's checkpoint metadata carries the
  save's commit timestamp (and travels with a copied directory); without it, the files' names and sizes."""
  path = os.path.join(filesystem.abspath(directory), PARAMS_SUBDIR)
  h = hashlib.sha256()
  meta = os.path.join(path, "_CHECKPOINT_METADATA")
  if filesystem.isfile(meta):
    with filesystem.open(meta, "rb") as f:
      h.update(f.read())
  else:
    for root, _, files in sorted(filesystem.walk(path)):
      for name in sorted(files):
        full = os.path.join(root, name)
        h.update(f"{os.path.relpath(full, path)}:{filesystem.getsize(full)}\n".encode())
  return h.hexdigest()[:16]


def has_params(directory: str) -> bool:
  return filesystem.isdir(os.path.join(filesystem.abspath(directory), PARAMS_SUBDIR))


def restore_params(directory: str, abstract_params: Any | None = None) -> Any:
  """Restores params; with `abstract_params` (ShapeDtypeStructs with shardings) directly into those shardings."""
  path = os.path.join(filesystem.abspath(directory), PARAMS_SUBDIR)
  if not filesystem.isdir(path):
    raise InputError(f"no parameter checkpoint at {path} (expected the output of `genret train` or "
                     f"`genret convert-hf`)", path=directory)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      meta = ckptr.metadata(path)
    except (FileNotFoundError, ValueError) as e:
      raise InputError(f"not an orbax parameter checkpoint ({e})", path=path) from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not tree or not filesystem.exists(os.path.join(path, "_METADATA")):
      raise InputError("not an orbax parameter checkpoint (no _METADATA: an interrupted save or another "
                       "directory)", path=path)
    # convert-hf before session 16 saved {"params": tree}; a model's own top-level names are its modules.
    wrapped = isinstance(tree, dict) and list(tree) == ["params"]
    saved = tree["params"] if wrapped else tree
    if abstract_params is not None:
      check_shapes(saved, abstract_params, path, "the model config")
    else:
      # Onto this process's first device, whatever mesh wrote it (e.g. a multi-host run): orbax refuses to
      # reuse saved shardings whose devices are not here.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    try:
      if wrapped:
        return ckptr.restore(path, {"params": abstract_params})["params"]
      return ckptr.restore(path, abstract_params)
    except Exception as e:   # tensorstore's read errors come as bare Exception and ValueError, 150 lines deep
      raise unreadable(path, e) from e


def unreadable(path: str, error: BaseException) -> InputError:
  """The error for a checkpoint whose metadata read but whose arrays do not (truncated or partly copied files)."""
  first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
  return InputError(f"checkpoint arrays unreadable (damaged or partly copied files?): {first[:300]}", path=path)


def check_shapes(got: Any, want: Any, path: str, what: str) -> None:
  """Raises an InputError naming the first parameter whose shape (or presence) differs between `got` (arrays or
  metadata with `.shape`) and `want` (what `what` implies), instead of orbax's or XLA's error later."""
  got_flat = {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
              for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  want_flat = {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
               for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  for name in sorted(set(got_flat) | set(want_flat)):
    g, w = got_flat.get(name), want_flat.get(name)
    if g != w:
      if g is None or w is None:
        raise InputError(f"parameter {name} is {'missing' if g is None else 'present'} here but "
                         f"{'present' if g is None else 'absent'} in {what}", path=path)
      raise InputError(f"parameter {name} has shape {g} but {what} implies {w}", path=path)


def _unboxed(boxed) -> Any:
  import flax.linen as nn
  # nn.meta.unbox would apply sharding constraints eagerly and fails on ShapeDtypeStructs (STACK.md trap 3).
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_shapes(model, batch_shapes=None) -> Any:
  """Unboxed ShapeDtypeStructs of `model`'s params (no allocation, no mesh)."""
  return _unboxed(model.abstract_params(batch_shapes))


def abstract_with_shardings(model, mesh, batch_shapes=None) -> Any:
  """Unboxed ShapeDtypeStructs of `model`'s params carrying their mesh shardings (restore target)."""
  from genret_jax.models import partitioning
  boxed = model.abstract_params(batch_shapes)
  shapes = _unboxed(boxed)
  shardings = partitioning.param_shardings(boxed, mesh, model.rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
