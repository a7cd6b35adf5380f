"""Keeping the processes of a multi-host job (jax.distributed) in step on the host side.

Every process runs the same program, and every jitted call on the global mesh, every all-gather and broadcast is a
collective that waits until each process has reached it. A step that fails, or takes another branch, on one
process alone therefore leaves the others waiting forever. The helpers here run a host step on every process and
exchange how it went, so that a failure or a disagreement stops every process with the same one-line error:

* `on_every_process(fn)`: every process's result, by process index;
* `agree(fn, digest)`: `fn`'s result, once every process's digest of it equals process 0's (or once
  `fn` has succeeded everywhere);
* `from_process_0(fn)`: process 0's result on every process (what only one process may do: write a file);
* `host_array(x)`: a global array as numpy on every process (`jax.device_get` refuses rows on another host);
* `place_global(arr, sharding)`: a numpy array every process holds whole, as a global array;
* `check_shared_directory(path)`: that every process sees the directory process 0 writes.

With one process each is `fn()` (or `jax.device_get`), with no collective and no pickling.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any, Callable

import jax
import numpy as np

from genret_jax.errors import InputError


def _message(e: BaseException) -> str:
  text = e.text if isinstance(e, InputError) else str(e)   # gin appends lines to str() of errors it re-raises
  return text.splitlines()[0] if text else type(e).__name__


def _run(fn: Callable[[], Any]) -> tuple[BaseException | None, tuple[bool, Any]]:
  try:
    return None, (True, fn())
  except Exception as e:   # pylint: disable=broad-except  (re-raised here after the exchange)
    return e, (False, _message(e))


def _raise_first_failure(error: BaseException | None, outcomes: list[tuple[bool, Any]], what: str) -> None:
  if error is not None:
    raise error
  failed = [(p, value) for p, (ok, value) in enumerate(outcomes) if not ok]
  if failed:
    raise InputError(f"process {failed[0][0]} failed {what}: {failed[0][1]}")


def _allgather_bytes(payload: bytes) -> list[bytes]:
  from jax.experimental import multihost_utils
  size = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int64))).reshape(-1)
  buf = np.zeros(max(int(size.max()), 1), np.uint8)
  buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(size), -1)
  return [every[p, :size[p]].tobytes() for p in range(len(size))]


def on_every_process(fn: Callable[[], Any], *, what: str = "its step") -> list[Any]:
  """Runs `fn` here and returns every process's result (picklable), by process index (two all-gathers: the sizes,
  then the pickles padded to the longest). An exception on any process is raised on all of them: on the one it
  happened on as itself, on the others as an InputError "process P failed WHAT: its first line"."""
  if jax.process_count() == 1:
    return [fn()]
  error, outcome = _run(fn)
  outcomes = [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(outcome))]
  _raise_first_failure(error, outcomes, what)
  return [value for _, value in outcomes]


def agree(fn: Callable[[], Any], digest: Callable[[Any], bytes | str] | None, *, what: str,
          differ: str = "") -> Any:
  """`fn()` here, after checking that `digest(fn())` is the same on every process (only the digests travel, as
  sha256). Failures are raised everywhere as in `on_every_process`; a disagreement as one InputError on every
  process, "processes [P, ...] DIFFER". Without `digest` only failures are exchanged: a step that must not fail
  on one process alone. With one process `digest` is not called."""
  if jax.process_count() == 1:
    return fn()

  def run():
    value = fn()
    d = b"" if digest is None else digest(value)
    return value, hashlib.sha256(d.encode() if isinstance(d, str) else bytes(d)).hexdigest()

  error, (ok, value) = _run(run)
  mine = (True, value[1]) if ok else (False, value)
  outcomes = [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(mine))]
  _raise_first_failure(error, outcomes, what)
  different = [p for p, (_, d) in enumerate(outcomes) if d != outcomes[0][1]]
  if different:
    raise InputError(f"processes {different} {differ}")
  return value[0]


def from_process_0(fn: Callable[[], Any], *, what: str = "its step") -> Any:
  """Runs `fn` on process 0 alone and returns its result (picklable) on every process (one broadcast). An
  exception there is raised on every process (as itself on process 0)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  error, payload = None, b""
  if jax.process_index() == 0:
    error, outcome = _run(fn)
    payload = pickle.dumps(outcome)
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int64)))[0])
  buf = np.zeros(size, np.uint8)
  if jax.process_index() == 0:
    buf[:] = np.frombuffer(payload, np.uint8)
  ok, value = pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8).tobytes())
  if error is not None:
    raise error
  if not ok:
    raise InputError(f"process 0 failed {what}: {value}")
  return value


def check_shared_directory(path: str, *, key: str, tries: int = 5) -> None:
  """Stops every process with one line, naming the config key, when some process does not see the directory that
  process 0 writes: a marker file process 0 writes there must be readable everywhere. Checkpoints of several hosts
  (orbax) and the files one process writes for the others need one directory every host sees, a gs:// URL or a
  shared mount; a path local to each host otherwise failed deep inside orbax or hung. A shared filesystem may show
  a new file a moment late (NFS attribute caches), so a miss is retried for about `tries` seconds."""
  if jax.process_count() == 1:
    return
  import os
  import time
  import uuid

  from genret_jax import atomic_files, filesystem

  def write() -> str:
    token = uuid.uuid4().hex
    atomic_files.write_text(os.path.join(path, f".genret_shared_{token}"), token)
    return token

  # Process 0's token, looked for in each process's own `path` (a relative path names another directory on each
  # host).
  token = from_process_0(write, what=f"writing a marker file into {path}")
  marker = os.path.join(path, f".genret_shared_{token}")

  def sees() -> bool:
    for attempt in range(tries):
      if filesystem.exists(marker):
        with filesystem.open(marker) as f:
          if f.read() == token:
            return True
      if attempt + 1 < tries:
        time.sleep(1.0)
    return False

  seen = on_every_process(sees, what=f"looking for process 0's marker file in {path}")
  from_process_0(lambda: filesystem.remove(marker), what=f"removing the marker file from {path}")
  blind = [p for p, ok in enumerate(seen) if not ok]
  if blind:
    raise InputError(f"processes {blind} do not see the directory process 0 writes ({path}): every host must see "
                     "one directory, a gs:// URL or a shared filesystem", key=key)


def place_global(arr: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """`arr`, which every process holds whole (the same values: compare them first), as a global array: each process
  gives its own devices' rows. `jax.device_put` of a numpy array on a multi-host sharding all-gathers it from every
  host to check that the copies are equal, on every call."""
  if jax.process_count() == 1:
    return jax.device_put(arr, sharding)
  return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def host_array(x: Any) -> Any:
  """`x` (a pytree of arrays, possibly sharded over every host's devices) as numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)
