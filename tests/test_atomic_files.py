"""Whole-or-nothing file writes: the one helper every cache, result and run file goes through."""

import concurrent.futures
import gzip
import json
import os

import pytest

from genret_jax import atomic_files


def test_writes_and_replaces(tmp_path):
  path = tmp_path / "sub" / "a.json"
  atomic_files.write_json(path, {"x": 1})
  atomic_files.write_json(path, {"x": 2}, indent=1)
  assert json.loads(path.read_text()) == {"x": 2}
  atomic_files.write_text(tmp_path / "t.txt", "é\n")
  assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é\n"
  atomic_files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  with atomic_files.atomic_open(tmp_path / "g.json.gz", "wt", opener=gzip.open) as f:
    json.dump([1, 2], f)
  with gzip.open(tmp_path / "g.json.gz", "rt") as f:
    assert json.load(f) == [1, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "g.json.gz", "sub", "t.txt"]
  assert os.listdir(tmp_path / "sub") == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with atomic_files.atomic_open(path) as f:
      f.write("half")
      raise RuntimeError("killed mid-write")
  with pytest.raises(TypeError):
    atomic_files.write_json(path, {"x": object()})
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["a.txt"]


def test_a_killed_writers_old_temporary_is_removed_by_the_next_write(tmp_path):
  """SIGKILL leaves `<name>.tmp<uuid>`; the next write of that file removes it once it is older than any live
  write could be, and leaves young ones (another host writing the same entry now) and other files' alone."""
  path = tmp_path / "a.json"
  old, young = (tmp_path / f"a.json.tmp{'0' * 32}"), (tmp_path / f"a.json.tmp{'1' * 32}")
  other = tmp_path / f"b.json.tmp{'0' * 32}"
  for p in (old, young, other):
    p.write_text("half")
  stale = os.path.getmtime(old) - atomic_files.STALE_AFTER_S - 60
  os.utime(old, (stale, stale))
  os.utime(other, (stale, stale))
  atomic_files.write_json(path, {"x": 1})
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", young.name, other.name])


def _write(path, i):
  for _ in range(20):
    atomic_files.write_json(path, {"writer": i, "pad": "x" * 100_000})
  return i


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
  """Two writers saving the same file (jobs sharing a cache) both finish and leave one whole file: a fixed
  temporary name made the second writer's rename fail once the first had renamed it away."""
  path = str(tmp_path / "shared.json")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    assert sorted(pool.map(_write, [path, path], [0, 1])) == [0, 1]
  assert json.loads(open(path).read())["writer"] in (0, 1)
  assert os.listdir(tmp_path) == ["shared.json"]
