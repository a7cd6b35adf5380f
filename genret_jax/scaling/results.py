"""The sweep results format (docs/scaling.md): RUN_DIR/results.csv + RUN_DIR/cells/<cell_id>/per_query.json.

The sweep writes it, `genret report` and `genret advise` read it. One CSV row per (model, beam) cell.
Reading validates every row and names file:line for the first bad value. RUN_DIR may be a URL (gs://): paths are
strings joined with os.path.join and read through `filesystem` (pathlib makes gs://b a local gs:/b).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

from genret_jax import atomic_files, filesystem
from genret_jax.corpora.lines import iter_lines
from genret_jax.errors import InputError

RESULTS_CSV = "results.csv"
CELLS_DIR = "cells"
PER_QUERY_JSON = "per_query.json"

RECALL_KS = (1, 5, 10, 20, 100)
METRIC_COLUMNS = ("cgl", "ce") + tuple(f"recall@{k}" for k in RECALL_KS) + ("mrr@10", "ndcg@10")
# name -> type; order is the CSV column order.
COLUMNS: dict[str, type] = {
    "family": str, "n_nonembed": float, "n_total": float, "data_fraction": float, "D": float,
    "train_flops": float, "beam": int, "decode_flops_per_query": float,
    **{m: float for m in METRIC_COLUMNS},
    "seed": int, "config": str, "wall_s": float, "cell_id": str,
}
REQUIRED = ("family", "n_nonembed", "D", "beam", "cgl", "cell_id")
POSITIVE = ("n_nonembed", "n_total", "D", "beam")


def _parse(value: str, kind: type, path: str, line: int, key: str) -> Any:
  value = value.strip()
  if kind is str:
    return value
  if value == "" or value.lower() in ("nan", "na", "none"):
    return math.nan if kind is float else None
  if value.lower().lstrip("+-") in ("inf", "infinity"):   # a fit of it failed later, noted as "config key y"
    raise InputError(f"{key} must be finite, got {value!r}", path=path, line=line, key=key)
  try:
    if kind is int:
      f = float(value)
      if f != int(f):
        raise ValueError
      return int(f)
    return float(value)
  except ValueError:
    raise InputError(f"{key}: expected {kind.__name__}, got {value!r}", path=path, line=line, key=key) from None


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of results.csv (path to the CSV or to its run directory), typed and validated.

  Unknown extra columns are kept as strings; missing optional columns read as NaN / None / "".
  """
  path = os.fspath(path)
  if filesystem.isdir(path):
    path = os.path.join(path, RESULTS_CSV)
  if not filesystem.exists(path):
    raise InputError("results table not found", path=path)
  # Strict UTF-8 per line, so a bad byte is an InputError at its line (csv over a text file raised a bare
  # UnicodeDecodeError); csv consumes one of these lines per `next`, so line_num is the physical line number.
  reader = csv.DictReader(line + "\n" for _, line in iter_lines(path))
  try:
    header = reader.fieldnames or []
  except csv.Error as e:
    raise InputError(f"malformed CSV: {e}", path=str(path), line=1) from None
  missing = [c for c in REQUIRED if c not in header]
  if missing:
    raise InputError(f"missing required column(s) {missing}", path=str(path), line=1)
  rows = []
  seen: dict[str, int] = {}
  while True:
    start = reader.line_num + 1
    try:
      raw = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise InputError(f"malformed CSV: {e}", path=str(path), line=start) from None
    line = reader.line_num
    if None in raw or any(v is None for v in raw.values()):   # csv's markers for too many / too few fields
      raise InputError(f"row has {'more' if None in raw else 'fewer'} fields than the header's {len(header)}",
                       path=str(path), line=line)
    row: dict[str, Any] = {}
    for key in header:
      kind = COLUMNS.get(key, str)
      row[key] = _parse(raw.get(key) or "", kind, str(path), line, key)
    for key, kind in COLUMNS.items():
      if key not in row:
        row[key] = math.nan if kind is float else (None if kind is int else "")
    for key in REQUIRED:
      if row[key] in ("", None) or (isinstance(row[key], float) and math.isnan(row[key])):
        raise InputError(f"{key} is empty", path=str(path), line=line, key=key)
    for key in POSITIVE:
      v = row[key]
      if v is not None and not (isinstance(v, float) and math.isnan(v)) and v <= 0:
        raise InputError(f"{key} must be > 0, got {v}", path=str(path), line=line, key=key)
    if row["cell_id"] in seen:
      raise InputError(f"duplicate cell_id {row['cell_id']!r} (first on line {seen[row['cell_id']]})",
                       path=str(path), line=line, key="cell_id")
    seen[row["cell_id"]] = line
    rows.append(row)
  if not rows:
    raise InputError("results table has no rows", path=str(path))
  return rows


def require_column(rows: list[dict[str, Any]], column: str, key: str) -> None:
  """InputError naming `key` when the table has no `column` (an unknown metric made the beam fits vanish)."""
  if column not in rows[0]:
    have = sorted(k for k in rows[0] if k in METRIC_COLUMNS or "@" in k)
    raise InputError(f"no column {column!r} in {RESULTS_CSV} (have {have})", key=key)


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file's value; a bad byte or bad JSON is an InputError naming the file (and line)."""
  with filesystem.open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise InputError(f"not valid UTF-8 (byte 0x{data[e.start]:02x})", path=str(path), line=line) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"invalid JSON: {e.msg}", path=str(path), line=e.lineno) from None


def write_results(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
  """Writes results.csv atomically (temp file + rename) with the standard columns first."""
  rows = list(rows)
  extra = sorted({k for r in rows for k in r} - set(COLUMNS))
  with atomic_files.atomic_open(path, newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(COLUMNS) + extra)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                      (repr(v) if isinstance(v, float) else v)) for k, v in r.items()})


def per_query_path(run_dir: str | os.PathLike, cell_id: str) -> str:
  return os.path.join(os.fspath(run_dir), CELLS_DIR, cell_id, PER_QUERY_JSON)


def write_per_query(run_dir: str | os.PathLike, cell_id: str, values: Mapping[str, Any]) -> None:
  """Writes cells/<cell_id>/per_query.json atomically; `values` maps metric name -> per-query list."""
  atomic_files.write_json(per_query_path(run_dir, cell_id),
                          {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in values.items()})


def load_per_query(run_dir: str | os.PathLike, cell_id: str) -> dict[str, Any] | None:
  """The cell's per-query values, or None if the cell has no per-query file."""
  path = per_query_path(run_dir, cell_id)
  if not filesystem.exists(path):
    return None
  data = read_json(path)
  if not isinstance(data, dict):
    raise InputError("per_query.json must hold an object of metric -> list", path=str(path))
  lengths = {k: len(v) for k, v in data.items() if isinstance(v, list) and k != "query_ids"}
  for k in lengths:
    bad = next((i for i, x in enumerate(data[k]) if isinstance(x, bool) or not isinstance(x, (int, float))
                or not math.isfinite(x)), None)
    if bad is not None:   # a null or inf made the fits that use this cell fail, noted as "config key y"
      raise InputError(f"{k}[{bad}] is {data[k][bad]!r}, not a finite number", path=str(path))
  if len(set(lengths.values())) > 1:
    raise InputError(f"per-query lists have different lengths {lengths}", path=str(path))
  return data
