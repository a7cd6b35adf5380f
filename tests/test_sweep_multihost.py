"""`genret sweep` as fresh processes: two on localhost (jax.distributed over gloo, one CPU device each), like
tests/test_cgl_multihost.py does for `genret cgl`. One model (T5 demo_ladder d0, 40 steps), CGL on 4 queries x
(positives + 16 negatives), retrieval at beams 1 and 3.

* The hosts run in their own directories with the relative --output_dir `sweep`; host 1's `sweep/models` is a link
  to host 0's, the one directory the sweep needs every host to see (the trainers' MODEL_DIRs, as for `genret
  train`). Process 0 alone writes sweep.gin, negatives.json, cells/ and results.csv: host 1's sweep directory
  holds only the link. results.csv (every column but the timings), the per-query files and the negatives equal
  exactly those of one fresh process with 2 CPU devices and a mesh of the same shape. The mesh is a `model` axis
  over the two hosts: both read the whole training batch, as the one process does; with `data` across hosts each
  reads its own shard of the seqio stream, so the trained models differ from one process's (tests/test_multihost.py
  trains that way). The reference runs as a fresh process because XLA:CPU's rounding depends on the client's
  device count: the same sweep in the test process, on 2 of its 8 devices, trained params up to 7e-7 away and
  gave CGL and CE about 6e-8 (relative) away from both two-device layouts.
  (Without distributed flags every host ran the whole sweep alone and wrote every file.)
* A restart finds the model done on process 0, which tells process 1 (whose sweep directory has no result.json,
  so it would have trained while process 0 went on), and with --report process 0 alone writes the report.
* Processes given different sweeps (here: another num_negatives) stop with one line each before anything runs.
"""

import json
import os
import subprocess
import sys

import pytest

from genret_jax.scaling import results as results_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_tasks  # noqa: E402

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)
_BINDINGS = [
    '--gin.SweepConfig.rungs={"t5": ["models/t5_1_1/demo_ladder/d0.gin"]}',
    "--gin.SweepConfig.data_fractions=(1.0,)", "--gin.SweepConfig.num_negatives=16",
    "--gin.SweepConfig.beams=(1, 3)", "--gin.SweepConfig.default_beam=3", "--gin.SweepConfig.max_eval_queries=4",
    # 40 steps: after 8 every retrieval metric was 0 at both beams, which compares nothing.
    "--gin.SweepConfig.min_train_steps=40", "--gin.SweepConfig.max_train_steps=40",
    '--gin.SweepConfig.extra_bindings=["LEARNING_RATE = 0.01", "WARMUP_STEPS = 4", "MeshConfig.data = 1", '
    '"MeshConfig.model = 2", "train.progress = False"]']
_TIMES = ("wall_s", "stage_s")   # seconds measured by process 0, not results


def _argv(*extra) -> list[str]:
  return [sys.executable, "-m", "genret_jax.cli", "sweep", "--gin_file=sweeps/demo.gin", *_BINDINGS,
          "--output_dir=sweep", *extra]


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=os.pathsep.join([_TESTS, _REPO, os.environ.get("PYTHONPATH", "")]),
              JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The sweep as one process with 2 CPU devices, a `model` axis as the hosts' mesh. It also builds the task's
  artefacts, retrieval index and CGL identifiers in GENRET_CACHE, which the hosts (sharing it) then only read."""
  cwd = tmp_path_factory.mktemp("one")
  p = subprocess.run(_argv(), cwd=cwd, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stdout[-3000:]
  return cwd / "sweep"


@pytest.fixture
def env():
  return _env(1)


def _two_hosts(tmp_path, env, argvs, timeout=240) -> tuple[list[str], list[int]]:
  """Runs argvs[i] as process i of 2 in its own directory tmp_path/host<i>."""
  for i in range(len(argvs)):
    (tmp_path / f"host{i}").mkdir(exist_ok=True)
  return toy_tasks.run_processes(argvs, [tmp_path / f"host{i}" for i in range(len(argvs))], [env] * len(argvs),
                                 timeout)


def _per_query(sweep_dir) -> dict:
  cells = sweep_dir / results_lib.CELLS_DIR
  return {name: json.loads((cells / name / results_lib.PER_QUERY_JSON).read_text())
          for name in sorted(os.listdir(cells)) if (cells / name / results_lib.PER_QUERY_JSON).exists()}


def test_two_process_sweep_equals_one_process_and_only_process_0_writes(tmp_path, env, one_process):
  shared_models = tmp_path / "host0" / "sweep" / "models"
  shared_models.mkdir(parents=True)
  (tmp_path / "host1" / "sweep").mkdir(parents=True)
  (tmp_path / "host1" / "sweep" / "models").symlink_to(shared_models)
  outs, codes = _two_hosts(tmp_path, env, [_argv(), _argv()])
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  for o in outs:
    assert "[1/1] t5-d0-f100: training + evaluation" in o, o[-3000:]
  two = tmp_path / "host0" / "sweep"
  assert sorted(os.listdir(two)) == ["cells", "models", "negatives.json", "results.csv", "sweep.gin"]
  assert os.listdir(tmp_path / "host1" / "sweep") == ["models"]
  assert os.listdir(tmp_path / "host1") == ["sweep"]
  assert os.listdir(shared_models) == ["t5-d0-f100"]

  one_rows, two_rows = results_lib.load_results(one_process), results_lib.load_results(two)
  assert [r["beam"] for r in two_rows] == [1, 3]
  assert [{k: v for k, v in r.items() if k not in _TIMES} for r in two_rows] == \
         [{k: v for k, v in r.items() if k not in _TIMES} for r in one_rows]
  assert any(r["recall@100"] > 0 for r in two_rows), two_rows   # the retrieval columns compare something
  assert _per_query(two) == _per_query(one_process) and len(_per_query(two)) == 2
  assert (two / "negatives.json").read_bytes() == (one_process / "negatives.json").read_bytes()

  # Restart: process 0 finds the model done and says so to process 1, which sees no result.json of its own.
  table = (two / results_lib.RESULTS_CSV).read_bytes()
  result = two / results_lib.CELLS_DIR / "t5-d0-f100" / "result.json"
  mtime = result.stat().st_mtime_ns
  outs, codes = _two_hosts(tmp_path, env, [_argv("--report", "--bootstrap=20")] * 2)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  for o in outs:
    assert "[1/1] t5-d0-f100: already done" in o and "training + evaluation" not in o, o[-3000:]
    assert f"report: {two / 'report.md'}" in o, o[-3000:]
  assert result.stat().st_mtime_ns == mtime and (two / results_lib.RESULTS_CSV).read_bytes() == table
  assert (two / "report.md").exists() and (two / "plots").is_dir()
  assert os.listdir(tmp_path / "host1" / "sweep") == ["models"]


def test_a_models_directory_one_host_cannot_see_stops_every_process(tmp_path, env):
  """Host 1 without the link to host 0's `sweep/models`: both stop with one line before any model trains."""
  outs, codes = _two_hosts(tmp_path, env, [_argv(), _argv()], timeout=120)
  assert codes == [2, 2], outs
  for o in outs:
    assert "processes [1] do not see the directory process 0 writes" in o, o[-3000:]
    assert "training + evaluation" not in o
  assert os.listdir(tmp_path / "host0" / "sweep" / "models") == []


def test_processes_given_different_sweeps_stop(tmp_path, env):
  outs, codes = _two_hosts(tmp_path, env, [_argv(), _argv("--gin.SweepConfig.num_negatives=8")], timeout=120)
  assert codes == [2, 2], outs
  for o in outs:
    assert "genret sweep: error: processes [1] see another sweep than process 0" in o, o[-3000:]
  assert os.listdir(tmp_path / "host0") == [] and os.listdir(tmp_path / "host1") == []
