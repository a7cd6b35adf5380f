"""One error type for bad user input, so the CLI can print one clear line instead of a traceback."""

from __future__ import annotations

import numbers


class InputError(ValueError):
  """Bad input data or configuration, located by file and line (or by config key)."""

  def __init__(self, message: str, path: str | None = None, line: int | None = None,
               key: str | None = None):
    self.path, self.line, self.key, self.message = path, line, key, message
    where = ""
    if path is not None:
      where = f"{path}:{line}: " if line is not None else f"{path}: "
    elif key is not None:
      where = f"config key {key}: "
    self.text = where + message   # str(self) can grow: gin appends "In call to configurable ..." to args
    super().__init__(self.text)


def check_int(value, key: str, low: int = 1) -> int:
  """`value` when it is an integer >= `low`, else an InputError naming the config key (a 0 or a string size
  otherwise fails far from the config, inside TF, XLA or numpy)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise InputError(f"must be an integer >= {low}, got {value!r}", key=key)
  return int(value)
