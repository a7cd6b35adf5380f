"""Two processes on localhost (jax.distributed over gloo, one CPU device each) train one model on a 2-device
global mesh, each reading its own shard of the seqio stream; the result is a normal checkpoint."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from genret_jax.models import params_io

sys.path.insert(0, os.path.dirname(__file__))
import toy_tasks  # noqa: E402

GIN = toy_tasks.train_gin(steps=30, mesh_data=-1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_training(tmp_path):
  gin_path = tmp_path / "toy.gin"
  gin_path.write_text(GIN)
  model_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = _free_port()
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
  # Both processes saw a 2-device global mesh (one device each) and trained to the end.
  for out in outs:
    assert "trained to step 30" in out
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  params = params_io.restore_params(model_dir)
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  assert sorted(d for d in os.listdir(model_dir / "checkpoints") if d.isdigit())[-1] == "30"
