"""Paths that may be local or on an object store (gs://, s3://): what MODEL_DIR and CHECKPOINT_PATH may be.

A pod run keeps its MODEL_DIR on GCS (t5x's convention): orbax and tf.summary take gs:// themselves, and the
files we write ourselves go through here. Local paths use `os` (so `atomic_files` keeps its fsync and atomic
rename); URLs go through `tf.io.gfile`, which TensorFlow registers for gs:// (and ram://, an in-memory store the
tests use). Before this module `os.path.abspath("gs://b/run")` made `<cwd>/gs:/b/run` and a pod run wrote its
checkpoints to each host's local disk without a word.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import IO, Iterator

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL other than file://."""
  m = _URL.match(os.fspath(path))
  return bool(m) and m.group(1).lower() != "file"


def _local(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.lower().startswith("file://") else path


def _gfile():
  try:
    import tensorflow as tf
  except ImportError as e:   # accelerator hosts may run the step without TF; remote paths need it
    raise ImportError("paths such as gs://... are read and written through tf.io.gfile: install tensorflow-cpu "
                      "(a runtime dependency of genret-jax)") from e
  return tf.io.gfile


def abspath(path: str | os.PathLike) -> str:
  """os.path.abspath for local paths; a URL unchanged but for trailing slashes."""
  if is_remote(path):
    return os.fspath(path).rstrip("/")
  return os.path.abspath(_local(path))


def exists(path) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(_local(path))


def isdir(path) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(_local(path))


def isfile(path) -> bool:
  if is_remote(path):
    g = _gfile()
    return g.exists(path) and not g.isdir(path)
  return os.path.isfile(_local(path))


def makedirs(path) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(_local(path), exist_ok=True)


def listdir(path) -> list[str]:
  """Entry names; gfile lists object-store "directories" with a trailing slash, stripped here."""
  if is_remote(path):
    return [n.rstrip("/") for n in _gfile().listdir(path)]
  return os.listdir(_local(path))


def walk(path) -> Iterator[tuple[str, list[str], list[str]]]:
  if is_remote(path):
    for root, dirs, files in _gfile().walk(path):
      yield root, [d.rstrip("/") for d in dirs], list(files)
  else:
    yield from os.walk(_local(path))


def getsize(path) -> int:
  return int(_gfile().stat(path).length) if is_remote(path) else os.path.getsize(_local(path))


def remove(path) -> None:
  if is_remote(path):
    _gfile().remove(path)
  else:
    os.remove(_local(path))


def rmtree(path, ignore_errors: bool = False) -> None:
  if not is_remote(path):
    shutil.rmtree(_local(path), ignore_errors=ignore_errors)
    return
  g = _gfile()
  try:
    g.rmtree(path)
  except Exception:   # tf.errors.NotFoundError and friends (tf.errors is not an OSError)
    if not ignore_errors:
      raise


def rmdir(path) -> None:
  """Removes an empty directory; raises OSError when it is not empty (or absent). On an object store a directory
  with nothing under it has no objects left, so there is nothing to remove but its marker, if any."""
  if not is_remote(path):
    os.rmdir(_local(path))
    return
  g = _gfile()
  if g.exists(path) and g.listdir(path):
    raise OSError(f"directory not empty: {path}")
  try:
    g.remove(path)
  except Exception:   # no marker object: already gone
    pass


def copy_from_local(local_path: str, dst) -> None:
  """Uploads a local file to `dst` (a URL or a local path), replacing it."""
  if is_remote(dst):
    _gfile().copy(local_path, dst, overwrite=True)
  else:
    shutil.copyfile(local_path, _local(dst))


def open(path, mode: str = "r", encoding: str | None = None) -> IO:   # noqa: A001  (the builtin's name, on purpose)
  """Opens for reading (or writing, remote files written whole by `atomic_files`); text modes default to UTF-8."""
  if "b" not in mode and encoding is None:
    encoding = "utf-8"
  if not is_remote(path):
    import builtins
    return builtins.open(_local(path), mode, encoding=encoding)
  if "b" not in mode and encoding.lower().replace("-", "") != "utf8":   # GFile's text modes are UTF-8
    raise ValueError(f"{path}: only UTF-8 text is supported on remote paths (asked for {encoding})")
  return _gfile().GFile(path, mode.replace("t", ""))
