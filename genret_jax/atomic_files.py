"""Files written whole or not at all: a temporary file in the target's directory, renamed into place.

Every cache, result and run file goes through here, so a killed job or two jobs writing the same entry (hosts
sharing a filesystem) never leave a reader half a file. The temporary name carries a uuid, not a pid: pids repeat
across hosts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, opener: Callable[..., Any] = open,
                **open_kwargs) -> Iterator[Any]:
  """Opens a temporary file for writing and, when the block ends without an exception, renames it to `path`.

  `opener` is `open` or one with its signature (`gzip.open`); text modes default to UTF-8. On an exception the
  temporary file is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  if os.path.isdir(path):   # checked first: the rename's error would name the temporary file
    raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if "b" not in mode:
    open_kwargs.setdefault("encoding", "utf-8")
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


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, **dump_kwargs)
