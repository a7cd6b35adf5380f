"""t5x-style gin flags: repeatable --gin_file, --gin.NAME=VALUE bindings, --gin_bindings, --gin_search_paths."""

from __future__ import annotations

import argparse
import logging
import os
import re
import tokenize
from typing import Sequence

import gin

from genret_jax import filesystem
from genret_jax.errors import InputError

_GIN_DOT = re.compile(r"^--gin\.([^=]+)=(.*)$", re.S)

# Packaged configs are always searchable, so `--gin_file=runs/train.gin` works from any directory.
PACKAGE_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Rewrites `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (what t5x's gin_utils does)."""
  out = []
  for arg in argv:
    m = _GIN_DOT.match(arg)
    out.append(f"--gin_bindings={m.group(1)} = {m.group(2)}" if m else arg)
  return out


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="Gin config file; repeatable, later files override earlier ones.")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="Gin binding, e.g. 'TRAIN_STEPS = 100'. `--gin.TRAIN_STEPS=100` is the same.")
  parser.add_argument("--gin_search_paths", action="append", default=[],
                      help="Extra directories to resolve --gin_file and `include` against.")


class _QuietSearchPaths(logging.Filter):
  """gin logs 'Path not found' at ERROR for every search path it tries before the one that resolves."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


logging.getLogger().addFilter(_QuietSearchPaths())


def _resolve(path: str, search_paths: Sequence[str]) -> str | None:
  if filesystem.is_remote(path):   # a model.gin next to params on gs://
    if not filesystem.exists(path):
      return None
    import tensorflow as tf
    gin.config.register_file_reader(tf.io.gfile.GFile, tf.io.gfile.exists)   # gin reads with `open` only
    return path
  for base in ["", *search_paths]:
    candidate = os.path.join(base, path) if base else path
    if os.path.exists(candidate):
      return os.path.abspath(candidate)
  return None


def find_gin_file(path: str, search_paths: Sequence[str] = ()) -> str | None:
  """`path` as parse_gin resolves it (as given, then under gin_configs/ and `search_paths`), or None."""
  return _resolve(path, [PACKAGE_GIN_DIR, *search_paths])


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
              finalize: bool = False) -> None:
  """Parses configs with clear errors naming the file or binding that is wrong.

  Not finalized by default: stages import their modules lazily, and a locked config refuses configurables
  registered after parsing.
  """
  gin.clear_config()
  for p in [PACKAGE_GIN_DIR, os.getcwd(), *search_paths]:
    gin.add_config_file_search_path(p)
  resolved = []
  for f in gin_files:
    r = _resolve(f, [PACKAGE_GIN_DIR, *search_paths])
    if r is None:
      raise InputError(f"gin file not found (searched ., {PACKAGE_GIN_DIR}, {list(search_paths)})", path=f)
    resolved.append(r)
  # One file at a time, then the bindings (what parse_config_files_and_bindings does), so an error without a
  # location of its own (tokenize's "EOF in multi-line statement") still names its file.
  errors = (ValueError, SyntaxError, KeyError, ImportError, tokenize.TokenError, OSError)
  for r in resolved:
    try:
      gin.parse_config_file(r)
    except errors as e:
      raise InputError(f"invalid gin config: {_one_line(e)}", path=r) from e
  for binding in bindings:   # one at a time: the error names the binding that is wrong
    try:
      gin.parse_config(binding)
    except errors as e:
      hint = (" (strings need quotes: --gin.NAME=\\\"value\\\")" if "malformed node" in str(e) else "")
      raise InputError(f"invalid gin binding: {_one_line(e)}{hint}", key=binding) from e
  if finalize:
    gin.finalize()


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def check_required(**values) -> None:
  """Raises an InputError naming the first macro left at `%gin.REQUIRED` (gin passes its marker object on
  to the callee, where it failed later as a TypeError far from the config)."""
  for macro, value in values.items():
    if value is gin.REQUIRED:
      raise InputError(f"{macro} is required: bind it in a gin file or pass --gin.{macro}=...", key=macro)


def config_value(name: str, default=None):
  """Reads a macro (e.g. 'MODEL_DIR') or 'scope/fn.param' value, or `default` when unbound."""
  try:
    return gin.query_parameter(name if "." in name else f"%{name}")
  except ValueError:
    return default
