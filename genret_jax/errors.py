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


class Preempted(Exception):
  """A job stopped by a preemption notice after saving what it needs to resume; the command exits with
  `EXIT_CODE`."""
  # 128 + SIGTERM, as if the signal had killed the process: a scheduler that restarts failed jobs restarts this
  # one (exit 0 told it the job had finished).
  EXIT_CODE = 143


def check_int(value, key: str, low: int = 1) -> int:
  """`value` when it is an integer >= `low`, else an InputError naming the config key (a 0 or a string size
  otherwise fails far from the config, inside TF, XLA or numpy)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise InputError(f"must be an integer >= {low}, got {value!r}", key=key)
  return int(value)


def check_float(value, key: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False) -> float:
  """`value` as a float when it is a real number within [low, high] (low excluded with `low_open`), else an
  InputError naming the config key (a string learning rate otherwise fails inside optax, under jit)."""
  ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value <= high
  if not ok:
    bounds = " and ".join(b for b in ((f"> {low}" if low_open else f">= {low}") if low is not None else "",
                                      f"<= {high}" if high is not None else "") if b)
    raise InputError(f"must be a number{' ' + bounds if bounds else ''}, got {value!r}", key=key)
  return float(value)
