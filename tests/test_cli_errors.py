"""Bad configs and output paths end in one line naming the file, binding or macro, exit status 2 (they were
tracebacks from inside gin, tokenize or the OS)."""

import pytest

from genret_jax import cli


@pytest.fixture(autouse=True)
def _clean_gin():
  import gin
  yield
  gin.clear_config()


def _error(capsys, *argv) -> str:
  assert cli.main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err, err
  return err


def test_gin_mistakes_are_one_line(tmp_path, capsys):
  (tmp_path / "macro.gin").write_text("include 'models/t5_1_1/tiny.gin'\nmodels.T5Config.d_model = %NO_SUCH\n")
  assert "macro %NO_SUCH is used but never bound" in _error(capsys, "model-info", f"--gin_file={tmp_path}/macro.gin")
  (tmp_path / "syntax.gin").write_text("import genret_jax.models\nmodels.T5Config.d_model = (64\n")
  assert _error(capsys, "model-info", f"--gin_file={tmp_path}/syntax.gin").startswith(
      f"genret model-info: error: {tmp_path}/syntax.gin: invalid gin config")
  assert "invalid gin binding" in _error(capsys, "model-info", "--gin_file=models/t5_1_1/tiny.gin",
                                         "--gin.VOCAB_SIZE=(1")
  err = _error(capsys, "model-info", "--gin_file=models/t5_1_1/tiny.gin", "--gin.VOCAB_SIZE=100",
               "--gin.models.T5Config.nope=3")
  assert "config key models.T5Config.nope = 3: invalid gin binding" in err   # the wrong one, not all of them
  assert "strings need quotes" in _error(capsys, "model-info", "--gin_file=models/t5_1_1/tiny.gin",
                                         "--gin.models.T5Config.dtype=float32")
  (tmp_path / "include.gin").write_text("include 'models/nope.gin'\n")
  assert "Unable to open file: models/nope.gin" in _error(capsys, "model-info", f"--gin_file={tmp_path}/include.gin")
  assert "Required bindings for `get_model`" in _error(capsys, "model-info")


def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, capsys):
  (tmp_path / "afile").write_text("")
  fits = tmp_path / "fits.json"
  fits.write_text('{"flops": {"train_flops_per_param_example": 1, "decode_flops_per_param_beam": 1}, '
                  '"families": {}}')
  err = _error(capsys, "advise", "--fit", str(fits), "--budget", "1e9", "--queries", "1", "--output", str(tmp_path))
  assert err == f"genret advise: error: {tmp_path}: is a directory, not a file"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "fits.json"]   # no temporary file left
  err = _error(capsys, "build-ids", "--corpus", "default", "--scheme", "atomic", "--output", str(tmp_path / "afile"))
  assert err.startswith(f"genret build-ids: error: {tmp_path / 'afile'}:")
  # Raised inside a gin configurable, whose proxy of the error had lost its file name (a traceback).
  import os
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  import toy_tasks
  (tmp_path / "toy.gin").write_text(toy_tasks.train_gin(steps=1, mesh_data=1))
  err = _error(capsys, "train", f"--gin_file={tmp_path / 'toy.gin'}", f'--gin.train.model_dir="{tmp_path / "afile"}"')
  assert err == f"genret train: error: {tmp_path / 'afile'}: File exists"


def test_multihost_flags_are_checked(monkeypatch, capsys):
  """--process_count without --coordinator_address was ignored (each host trained alone as process 0 of 1)."""
  assert "need --coordinator_address" in _error(capsys, "train", "--process_count=2", "--process_index=0")
  assert "must lie in [0, --process_count 2)" in _error(capsys, "train", "--coordinator_address=localhost:1",
                                                        "--process_count=2", "--process_index=5")
  monkeypatch.setenv("GENRET_PROCESS_COUNT", "abc")
  assert "GENRET_PROCESS_COUNT='abc' is not an integer" in _error(capsys, "train")


def test_missing_directories_are_named_as_missing(tmp_path, capsys):
  """A nonexistent checkpoint was reported as "no model.gin next to the params"."""
  err = _error(capsys, "retrieve", "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH=\"{tmp_path}/nope\"")
  assert err.endswith(f"{tmp_path}/nope: CHECKPOINT_PATH: no such directory")
  err = _error(capsys, "convert-hf", "--hf_dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
  assert f"{tmp_path}/nope: no such directory" in err


def test_option_ranges_are_one_line(capsys):
  assert _error(capsys, "inspect", "default", "--max-docs", "-3").endswith(
      "config key --max-docs: must be an integer >= 1, got -3")   # read as "empty corpus: no documents found"
  assert "mesh size data=0: give a size >= 1, or -1" in _error(   # shown as data 1
      capsys, "model-info", "--gin_file=models/t5_1_1/tiny.gin", "--mesh", "data=0,model=2")
  assert "config key --inputs_length: must be an integer >= 1, got -5" in _error(   # printed negative FLOPs
      capsys, "model-info", "--gin_file=models/t5_1_1/tiny.gin", "--inputs_length", "-5")


def test_unknown_task_is_named_before_model_dir_is_made(tmp_path, capsys, caplog):
  """The name was checked after MODEL_DIR and a checkpoint manager were made, and seqio listed every registered
  mixture at INFO (~200 lines) above the error."""
  import logging
  caplog.set_level(logging.INFO)
  model_dir = tmp_path / "run"
  err = _error(capsys, "train", "--gin_file=runs/train.gin", "--gin_file=models/t5_1_1/cpu_ladder/r0.gin",
               "--gin.MIXTURE_OR_TASK_NAME='nope_task'", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=5")
  assert "config key MIXTURE_OR_TASK_NAME: no seqio task or mixture named 'nope_task'" in err
  assert not model_dir.exists()
  assert not [r for r in caplog.records if "Available mixture" in r.getMessage()]


def test_unreachable_object_store_paths_are_one_line(capsys):
  """A URL tf.io.gfile cannot reach (here a scheme TensorFlow does not implement; on a pod: no such bucket, no
  permission) was a traceback from inside TensorFlow: its errors are not OSErrors."""
  assert _error(capsys, "report", "s3://bucket/run") == \
      "genret report: error: File system scheme 's3' not implemented (file: 's3://bucket/run')"
  err = _error(capsys, "retrieve", "--gin_file=runs/infer.gin", '--gin.CHECKPOINT_PATH="s3://bucket/run"',
               '--gin.MIXTURE_OR_TASK_NAME="any"')
  assert err.startswith("genret retrieve: error: ") and "s3://bucket/run" in err, err
