"""Line-level file reading shared by every reader: gzip or plain, strict UTF-8, 1-based line numbers.

Decoding happens per line (not per file) so a bad byte is reported at the line that holds it, which is what a
user needs to fix a 21M-line passage file.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
import zlib
from typing import Iterator, Sequence

from genret_jax import filesystem
from genret_jax.errors import InputError

PathLike = str | os.PathLike


def is_gzip(path: PathLike) -> bool:
  return str(path).endswith(".gz")


def _open_binary(path: PathLike):
  """Local or a URL (gs://, through `filesystem`)."""
  if not filesystem.exists(path):
    raise InputError("file not found", path=str(path))
  if filesystem.isdir(path):
    raise InputError("expected a file, found a directory", path=str(path))
  if not filesystem.is_remote(path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")
  return _remote_binary(path)


@contextlib.contextmanager
def _remote_binary(path: PathLike):
  with filesystem.open(path, "rb") as f:   # GzipFile does not close a file object it was given
    yield gzip.GzipFile(fileobj=f, mode="rb") if is_gzip(path) else f


def iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
  """Yields (line_number, line) with the line ending removed; raises InputError on bad bytes or gzip data."""
  path_s = str(path)
  lineno = 0
  try:
    with _open_binary(path) as f:
      for raw in f:
        lineno += 1
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
          raw = raw[3:]
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise InputError(
              f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", path=path_s,
              line=lineno) from None
        yield lineno, line.rstrip("\r\n")
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise InputError(f"corrupt gzip data after line {lineno}: {e}", path=path_s, line=lineno + 1) from None


def iter_tsv_rows(path: PathLike, *, quoting: bool = True) -> Iterator[tuple[int, list[str]]]:
  """Yields (line_number, fields) for each non-blank TSV row.

  With `quoting`, rows are parsed like DPR's `csv.reader(f, delimiter="\\t")` (psgs_w100 quotes its text field
  and doubles inner quotes); a quoted field spanning lines is reported at the line where the row starts.
  """
  path_s = str(path)
  if not quoting:
    for lineno, line in iter_lines(path):
      if line.strip(" \r\n"):
        yield lineno, line.split("\t")
    return
  # csv.reader consumes exactly one of our lines per `next`, so its line_num equals the physical line number.
  lines = (line + "\n" for _, line in iter_lines(path))
  reader = csv.reader(lines, delimiter="\t")
  start = 1
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise InputError(f"malformed TSV row: {e}", path=path_s, line=start) from None
    if len(row) > 1 or (row and row[0].strip()):   # blank lines only: a row of empty fields is the caller's to refuse
      yield start, row
    start = reader.line_num + 1


def check_columns(row: Sequence[str], expected: int, what: str, path: PathLike, lineno: int) -> None:
  if len(row) != expected:
    raise InputError(
        f"malformed TSV row: expected {expected} tab-separated columns ({what}), found {len(row)}",
        path=str(path), line=lineno)
