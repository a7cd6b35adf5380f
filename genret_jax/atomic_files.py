"""Files written whole or not at all: a temporary file in the target's directory, renamed into place.

Every cache, result and run file goes through here, so a killed job or two jobs writing the same entry (hosts
sharing a filesystem) never leave a reader half a file. The temporary name carries a uuid, not a pid: pids repeat
across hosts. On an object store (gs://, `filesystem.is_remote`) the file is written to a local temporary and
uploaded whole: an object becomes visible only when its upload completes, which is the same guarantee.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator

from genret_jax import filesystem


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, opener: Callable[..., Any] = open,
                **open_kwargs) -> Iterator[Any]:
  """Opens a temporary file for writing and, when the block ends without an exception, renames it to `path`.

  `opener` is `open` or one with its signature (`gzip.open`); text modes default to UTF-8. On an exception the
  temporary file is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  if "b" not in mode:
    open_kwargs.setdefault("encoding", "utf-8")
  if filesystem.is_remote(path):
    with _remote_atomic_open(path, mode, opener, open_kwargs) as f:
      yield f
    return
  if os.path.isdir(path):   # checked first: the rename's error would name the temporary file
    raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _remove_stale_temporaries(path)
  tmp = f"{path}.tmp{uuid.uuid4().hex}"
  try:
    with opener(tmp, mode, **open_kwargs) as f:
      yield f
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)   # the data is on disk before the rename makes it visible
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


# A writer killed with SIGKILL (or a host that died) leaves its temporary behind; the next write of the same file
# removes those old enough that no live writer can still hold them (another host may be writing the same entry).
STALE_AFTER_S = 6 * 3600
_TMP_SUFFIX = re.compile(r"\.tmp[0-9a-f]{32}$")


def _remove_stale_temporaries(path: str) -> None:
  directory, name = os.path.split(os.path.abspath(path))
  now = time.time()
  try:
    entries = os.scandir(directory)
  except OSError:
    return
  with entries:
    for e in entries:
      if e.name.startswith(name) and _TMP_SUFFIX.fullmatch(e.name[len(name):]):
        with contextlib.suppress(OSError):   # gone already, or another process's cleanup won
          if now - e.stat().st_mtime > STALE_AFTER_S:
            os.remove(e.path)


@contextlib.contextmanager
def _remote_atomic_open(path: str, mode: str, opener: Callable[..., Any], open_kwargs: dict) -> Iterator[Any]:
  if filesystem.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
  fd, tmp = tempfile.mkstemp(prefix="genret-upload-")
  os.close(fd)
  try:
    with opener(tmp, mode, **open_kwargs) as f:
      yield f
    filesystem.makedirs(os.path.dirname(path))
    filesystem.copy_from_local(tmp, path)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_with(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
  """Whole or not at all, for a library that writes a file by name (safetensors' `save_file`): `write` gets the
  temporary file's path."""
  with atomic_open(path, "wb", opener=lambda tmp, mode: contextlib.nullcontext(tmp)) as tmp:
    write(tmp)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, **dump_kwargs)
