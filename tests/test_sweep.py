"""The sweep end to end on the embedded corpus (tiny rungs, few steps): results table, per-query files, report,
restart skipping finished models (one with FLOPs from an older accounting named in a warning), and a model
without result.json (killed half way) redone."""

import json
import os
import pathlib

import numpy as np
import pytest

from genret_jax import gin_utils
from genret_jax.errors import InputError
from genret_jax.models import accounting
from genret_jax.scaling import results as results_lib
from genret_jax.scaling import sweep as sweep_lib


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  gin_utils.parse_gin(["sweeps/demo.gin"], [
      'SweepConfig.rungs = {"t5": ["models/t5_1_1/demo_ladder/d0.gin"], "llama": ["models/llama/demo_ladder/d0.gin"]}',
      "SweepConfig.data_fractions = (0.6, 1.0)", "SweepConfig.fraction_rungs = (0,)",
      'SweepConfig.fraction_families = ("t5",)', "SweepConfig.num_negatives = 64",
      "SweepConfig.beams = (1, 3)", "SweepConfig.default_beam = 2", "SweepConfig.max_eval_queries = 4",
      "SweepConfig.min_train_steps = 8", "SweepConfig.max_train_steps = 8"])
  cfg = sweep_lib.SweepConfig()
  out = str(tmp_path_factory.mktemp("sweep"))
  rows = sweep_lib.run_sweep(cfg, out, config_path="sweeps/demo.gin")
  return cfg, out, rows


def test_results_table_and_per_query(tiny_sweep):
  cfg, out, rows = tiny_sweep
  plan = sweep_lib.plan(cfg)
  assert [c["model_id"] for c in plan] == ["t5-d0-f060", "t5-d0-f100", "llama-d0-f100"]
  table = results_lib.load_results(out)
  # t5: f=0.6 at the default beam, f=1.0 at beams 1 and 3; llama: f=1.0 at beams 1 and 3.
  assert len(table) == len(rows) == 1 + 2 + 2
  chance = np.log1p(1 / cfg.num_negatives)
  for r in table:
    assert 0 < r["cgl"] < 3 * chance and r["n_nonembed"] > 0 and r["D"] > 0 and r["train_flops"] > 0
    assert 0.0 <= r["recall@10"] <= 1.0 and r["decode_flops_per_query"] > 0
    pq = json.load(open(results_lib.per_query_path(out, r["cell_id"])))
    assert len(pq["cgl"]) == len(pq["query_ids"]) == 4
  by_f = {(r["family"], r["data_fraction"]): r["D"] for r in table}
  assert by_f[("t5", 0.6)] < by_f[("t5", 1.0)]
  # Decode FLOPs grow with the beam.
  t5_rows = sorted((r for r in table if r["family"] == "t5" and r["data_fraction"] == 1.0), key=lambda r: r["beam"])
  assert t5_rows[0]["decode_flops_per_query"] < t5_rows[1]["decode_flops_per_query"]
  # Every model saw the same negatives.
  assert os.path.exists(os.path.join(out, "negatives.json"))


def test_restart_skips_finished_and_redoes_unfinished(tiny_sweep, capsys):
  cfg, out, _ = tiny_sweep
  killed = os.path.join(out, results_lib.CELLS_DIR, "t5-d0-f060", sweep_lib.RESULT_JSON)
  os.remove(killed)   # as if the process died before the model's evaluation was written
  # A model finished before the FLOP-accounting fix (its result.json has no flops_version) is kept, and named.
  old = pathlib.Path(out, results_lib.CELLS_DIR, "llama-d0-f100", sweep_lib.RESULT_JSON)
  stored = json.loads(old.read_text())
  assert stored.pop("flops_version") == accounting.FLOPS_VERSION
  old.write_text(json.dumps(stored))
  mtime = os.path.getmtime(os.path.join(out, results_lib.CELLS_DIR, "t5-d0-f100", sweep_lib.RESULT_JSON))
  rows = sweep_lib.run_sweep(cfg, out)
  printed = capsys.readouterr().out
  assert printed.count("already done") == 2 and "t5-d0-f060: training + evaluation" in printed
  warning = [line for line in printed.splitlines() if line.startswith("warning: ")]
  assert len(warning) == 1 and "1 finished model(s)" in warning[0] and "llama-d0-f100" in warning[0]
  assert os.path.exists(killed)
  assert os.path.getmtime(os.path.join(out, results_lib.CELLS_DIR, "t5-d0-f100", sweep_lib.RESULT_JSON)) == mtime
  assert len(rows) == 5
  # Finished models are reused only under the settings they were run with (they were reused under any).
  import dataclasses
  for changed in (dict(num_negatives=32), dict(train_epochs=3.0), dict(beams=(1, 4))):
    with pytest.raises(InputError, match="was finished with other settings"):
      sweep_lib.run_sweep(dataclasses.replace(cfg, **changed), out)


def test_report_from_sweep(tiny_sweep):
  from genret_jax.scaling import report
  _, out, _ = tiny_sweep
  path = report.make_report(out, report.ReportConfig(bootstrap_resamples=20, restarts=5))
  text = open(path).read()
  assert "CGL" in text and os.path.exists(os.path.join(out, "plots"))


def test_sweep_directory_on_an_object_store(tiny_sweep, tmp_path, monkeypatch, capsys):
  """--output_dir on an object store (ram:// standing in for gs://; orbax, which knows no ram://, mapped to local
  disk): the model's rows equal the local sweep's, results.csv, cells/, negatives.json, sweep files and the report
  with its plots land on the store, a rerun skips the finished model, and nothing goes to a local `ram:` path."""
  import dataclasses
  import uuid

  from test_filesystem import _orbax_on_local_disk

  from genret_jax import filesystem
  from genret_jax.scaling import report
  cfg, _, local_rows = tiny_sweep
  monkeypatch.chdir(tmp_path)
  _orbax_on_local_disk(monkeypatch, str(tmp_path / "orbax"))
  one = dataclasses.replace(cfg, rungs={"t5": cfg.rungs["t5"]}, data_fractions=(1.0,))
  remote = f"ram://genret-{uuid.uuid4().hex}/sweep"
  try:
    rows = sweep_lib.run_sweep(one, remote, config_path="sweeps/demo.gin")
    want = [r for r in local_rows if r["cell_id"].startswith("t5-d0-f100")]
    timing = ("wall_s", "stage_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in want]
    assert [r["cgl"] for r in results_lib.load_results(remote)] == [r["cgl"] for r in want]
    assert {"results.csv", "cells", "models", "negatives.json"} <= set(filesystem.listdir(remote))
    assert results_lib.load_per_query(remote, want[0]["cell_id"])["query_ids"]
    md = report.make_report(remote, report.ReportConfig(bootstrap_resamples=0, restarts=2))
    assert md == f"{remote}/report.md" and filesystem.exists(f"{remote}/fits.json")
    assert filesystem.listdir(f"{remote}/plots")
    capsys.readouterr()
    assert len(sweep_lib.run_sweep(one, remote)) == len(rows)
    assert "already done" in capsys.readouterr().out
    assert not (tmp_path / "ram:").exists()
  finally:
    filesystem.rmtree(remote, ignore_errors=True)


def test_preempted_training_stops_the_sweep_before_evaluating(tiny_sweep, monkeypatch):
  """A model whose training stopped on a preemption notice is not evaluated (its half-trained params were
  evaluated and recorded as the cell's result): the sweep raises Preempted (`genret sweep` exits 143) and the
  cell stays unfinished for the restart."""
  from genret_jax.errors import Preempted
  from genret_jax.training import trainer
  cfg, out, _ = tiny_sweep
  cell = pathlib.Path(out, results_lib.CELLS_DIR, "t5-d0-f060", sweep_lib.RESULT_JSON)
  kept = cell.read_bytes()
  cell.unlink()
  stopped = trainer.TrainResult(step=3, last_loss=1.0, losses=[1.0], eval_loss=None, params=None, model_dir="",
                                tokens_per_s=0.0, resumed_from=None, preempted=True)
  monkeypatch.setattr(trainer, "train", lambda *a, **k: stopped)
  try:
    with pytest.raises(Preempted, match="t5-d0-f060: checkpoint saved at step 3 of 8"):
      sweep_lib.run_sweep(cfg, out)
    assert not cell.exists()
  finally:
    cell.write_bytes(kept)


def test_plan_refuses_bad_beams_and_rungs_before_training():
  with pytest.raises(InputError, match="SweepConfig.beams"):
    sweep_lib.plan(sweep_lib.SweepConfig(rungs={"t5": ["models/t5_1_1/cpu_ladder/r0.gin"]}, beams=(0, 5)))
  with pytest.raises(InputError, match="SweepConfig.default_beam"):
    sweep_lib.plan(sweep_lib.SweepConfig(rungs={"t5": ["models/t5_1_1/cpu_ladder/r0.gin"]}, default_beam=-1))
  with pytest.raises(InputError, match="no models to train"):
    sweep_lib.plan(sweep_lib.SweepConfig(rungs={}))
  with pytest.raises(InputError, match="models/t5_1_1/cpu_ladder/r9.gin: gin file not found"):
    sweep_lib.plan(sweep_lib.SweepConfig(rungs={"t5": ["models/t5_1_1/cpu_ladder/r0.gin",
                                                       "models/t5_1_1/cpu_ladder/r9.gin"]}))
