"""Two processes on localhost (jax.distributed over gloo, one CPU device each) train one model on a 2-device
global mesh; the result is a normal checkpoint.

* `data` over the two hosts: each reads its own shard of the seqio stream, and evaluation (31 validation rows at
  3 rows per host and batch: 6 batches on one host, 5 on the other) runs as many batches on both, so the
  collectives match (unequal counts aborted gloo, and would hang a pod);
* `model` over the two hosts: both hold the same rows, so both must read the same, whole batch (each read half
  of it, and the replicated loss differed between the processes); the run equals a one-device run.

A restart on another host count (one process resuming the two-process `data` run) restores the checkpoint and
trains on.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from genret_jax.models import model_api, params_io
from genret_jax.models.t5 import T5Config
from genret_jax.training import trainer

sys.path.insert(0, os.path.dirname(__file__))
import toy_tasks  # noqa: E402

STEPS = 30


def _losses(out: str) -> tuple[float, float]:
  m = re.search(r"trained to step \d+: loss ([\d.]+), eval loss ([\d.]+)", out)
  assert m, out[-3000:]
  return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("mesh", ["data", "model"])
def test_two_process_training(tmp_path, mesh):
  gin_path = tmp_path / "toy.gin"
  gin = toy_tasks.train_gin(steps=STEPS, mesh_data=-1 if mesh == "data" else 1)
  gin += "train.batch_size = 6\ntrain.eval_every = 30\ntrain.eval_batches = 100\n"
  if mesh == "model":
    gin += "MeshConfig.model = 2\n"
  gin_path.write_text(gin)
  model_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = toy_tasks.free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "genret_jax.cli", "train", f"--gin_file={gin_path}",
                             f"--gin.train.model_dir=\"{model_dir}\"", f"--coordinator_address=localhost:{port}",
                             "--process_count=2", f"--process_index={i}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=400)
    outs.append(out)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  # Both processes saw a 2-device global mesh (one device each), trained to the end and agree on the losses.
  for out in outs:
    assert f"trained to step {STEPS}" in out
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  assert _losses(outs[0]) == _losses(outs[1])
  params = params_io.restore_params(model_dir)
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  assert sorted(d for d in os.listdir(model_dir / "checkpoints") if d.isdigit())[-1] == str(STEPS)
  one_process = lambda model_dir, steps: trainer.train(
      model=_toy_model(), mixture_or_task_name=toy_tasks.TASK, task_feature_lengths={"inputs": 16, "targets": 16},
      train_steps=steps, model_dir=str(model_dir), batch_size=6, mesh_config=trainer.MeshConfig(data=1),
      eval_every=steps, eval_batches=100, progress=False, write_config=False)
  if mesh == "model":   # the same global batches as one process reading the whole stream
    one = one_process(tmp_path / "one", STEPS)
    np.testing.assert_allclose(_losses(outs[0]), (one.last_loss, one.eval_loss), atol=2e-4)
  else:
    # A restart on another host count (one process, one device): the two-process checkpoint restores onto the new
    # mesh as saved, and its input position, saved per (shard, shard count), is not taken for the new single
    # shard: the run skips the consumed batches of its stream instead, and trains on.
    saved = params_io.restore_params(model_dir)
    again = one_process(model_dir, STEPS)
    assert again.resumed_from == STEPS and again.step == STEPS
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(again.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    more = one_process(model_dir, STEPS + 10)
    assert more.resumed_from == STEPS and more.step == STEPS + 10 and np.isfinite(more.last_loss)
    assert str(STEPS + 10) in os.listdir(model_dir / "checkpoints")
    assert (model_dir / "checkpoints_data" / str(STEPS + 10) / trainer._data_position_name(0, 1)).exists()


def _toy_model() -> model_api.EncoderDecoderModel:
  """`toy_tasks.train_gin`'s model."""
  return model_api.EncoderDecoderModel(T5Config(vocab_size=1024, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))


def test_processes_given_another_config_stop_before_training(tmp_path):
  """A host given another binding (here a batch size) stops every process with one line before anything trains:
  with other shapes the processes waited for each other forever; with the same shapes they trained on a mix."""
  gin_path = tmp_path / "toy.gin"
  gin_path.write_text(toy_tasks.train_gin(steps=STEPS, mesh_data=-1))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  argv = [sys.executable, "-m", "genret_jax.cli", "train", f"--gin_file={gin_path}",
          f"--gin.train.model_dir=\"{tmp_path / 'run'}\""]
  outs, codes = toy_tasks.run_processes([argv, [*argv, "--gin.train.batch_size=4"]], [None, None], [env, env],
                                        timeout=200)
  assert codes == [2, 2], outs
  for out in outs:
    assert "processes [1] see another training job than process 0" in out, out[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_model_dir_one_host_cannot_see_stops_every_process(tmp_path):
  """The same relative MODEL_DIR in two working directories (a path local to each host, as on a pod without a
  shared mount): both processes stop with one line naming MODEL_DIR before training, where orbax's multi-host
  save failed deep inside or hung."""
  gin_path = tmp_path / "toy.gin"
  gin_path.write_text(toy_tasks.train_gin(steps=STEPS, mesh_data=-1))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  argv = [sys.executable, "-m", "genret_jax.cli", "train", f"--gin_file={gin_path}", '--gin.train.model_dir="run"']
  cwds = [tmp_path / "host0", tmp_path / "host1"]
  for d in cwds:
    d.mkdir()
  outs, codes = toy_tasks.run_processes([argv, argv], cwds, [env, env], timeout=200)
  assert codes == [2, 2], outs
  for out in outs:
    assert "config key MODEL_DIR: processes [1] do not see the directory process 0 writes" in out, out[-2000:]
  for d in cwds:
    assert os.listdir(d / "run") == []   # the marker is gone again, nothing trained


def test_preemption_notice_on_one_host_checkpoints_every_host_at_one_step(tmp_path):
  """SIGTERM to one process only (hosts get their notices at different times): JAX's preemption service agrees a
  step, both processes checkpoint at it and exit 143, and the restart resumes from it on both."""
  import signal
  import time
  steps = 60
  gin_path = tmp_path / "toy.gin"
  gin_path.write_text(toy_tasks.train_gin(steps=steps, mesh_data=-1) + "train.batch_size = 6\n")
  model_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def start():
    port = toy_tasks.free_port()
    return [subprocess.Popen([sys.executable, "-m", "genret_jax.cli", "train", f"--gin_file={gin_path}",
                              f"--gin.train.model_dir=\"{model_dir}\"", f"--coordinator_address=localhost:{port}",
                              "--process_count=2", f"--process_index={i}"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]

  procs = start()
  ckdir = model_dir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (ckdir.exists() and any(d.isdigit() for d in os.listdir(ckdir))):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=240)[0] for p in procs]
  saved = []
  for i, (p, out) in enumerate(zip(procs, outs)):
    m = re.search(r"preempted: checkpoint saved at step (\d+)", out)
    assert m and p.returncode == 143, f"process {i} (rc {p.returncode}):\n{out[-3000:]}"
    saved.append(int(m.group(1)))
  assert saved[0] == saved[1] < steps and str(saved[0]) in os.listdir(ckdir)
  procs = start()
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"trained to step {steps}" in out, f"process {i}:\n{out[-3000:]}"
  final = [re.search(r"trained to step \d+: loss ([\d.]+)", out).group(1) for out in outs]
  assert final[0] == final[1]
