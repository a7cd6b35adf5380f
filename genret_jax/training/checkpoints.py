"""orbax CheckpointManager wrapper: train state + JSON metadata (data position, seed), atomic, keep-last-K.

orbax writes each step into a temporary directory and renames it when complete, so a process killed during a
save leaves only a tmp directory that `latest_step()` never returns; `cleanup_tmp_directories` removes it on the
next start.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from genret_jax import filesystem
from genret_jax.models import params_io


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int | None = 3, save_interval_steps: int = 1,
               async_save: bool = False):
    self.directory = filesystem.abspath(directory)   # gs:// kept: orbax writes there itself
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    return self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
    step = self.latest_step() if step is None else step
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    except Exception as e:   # see params_io.unreadable
      raise params_io.unreadable(os.path.join(self.directory, str(step)), e) from e
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs for `tree` (optionally with target shardings) to restore into."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
