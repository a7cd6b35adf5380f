"""`genret cgl` as fresh processes: two on localhost (jax.distributed over gloo, one CPU device each) on a 2-device
`data` mesh, like tests/test_retrieve_multihost.py does for `genret retrieve`.

* The two hosts share no filesystem here: each runs in its own directory with its own copy of GENRET_CACHE and a
  relative OUTPUT. Process 0 alone writes the output JSON, the negatives and the sampled n-gram identifiers; the
  numbers (per query and summary) equal one process's on 2 devices. (The command had no distributed flags: every
  host scored the whole split alone and wrote; given them, `device_get` of the scores refused rows on the other
  host.)
* Processes given different jobs (here: another NUM_NEGATIVES) stop with one line each instead of waiting for
  each other forever.
* The helpers of `genret_jax.multihost`: a failure or a disagreement on one process is raised on every process.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
import seqio

import toy_tasks
from genret_jax import cli
from genret_jax.models import model_api, params_io
from genret_jax.models.t5 import T5Config
from genret_jax.scaling import scoring

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)
_ARGS = ["--gin.NUM_NEGATIVES=8", "--gin.BATCH_SIZE=4", "--gin.genret.cgl_eval_run.max_queries=4",
         "--gin.genret.cgl_eval_run.bootstrap_resamples=200", "--gin.genret.cgl_eval_run.progress=False"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(checkpoint, GENRET_CACHE holding its task's artefacts, their directory's name), built once for the module:
  a tiny random T5 whose model.gin registers its task itself (n-gram identifiers), so the processes only load."""
  tmp = tmp_path_factory.mktemp("cglmh")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("GENRET_CACHE", str(tmp / "cache"))
    mp.setenv("GENRET_REGISTER_DEFAULT_TASKS", "0")
    ckpt, artefacts_dir = _checkpoint(tmp)
  return ckpt, tmp / "cache", os.path.basename(artefacts_dir)


@pytest.fixture
def env(tmp_path, monkeypatch, checkpoint):
  """Each test's hosts get their own copies of the built cache (tmp_path/cache0, cache1)."""
  for i in range(2):
    shutil.copytree(checkpoint[1], tmp_path / f"cache{i}")
  monkeypatch.setenv("GENRET_REGISTER_DEFAULT_TASKS", "0")
  return dict(os.environ, PYTHONPATH=os.pathsep.join([_TESTS, _REPO, os.environ.get("PYTHONPATH", "")]),
              JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _checkpoint(tmp_path):
  import tasks
  names = tasks.register_collection_tasks("mhcgl", "default", "ngram", vocab_size=300)
  task = seqio.get_mixture_or_task(names["retrieval"])
  vocab_size = task.output_features["targets"].vocabulary.vocab_size
  artefacts = tasks.artefacts_for(names["retrieval"])
  artefacts.identifier_scheme()
  artefacts.query_splits()
  model = model_api.EncoderDecoderModel(T5Config(vocab_size=vocab_size, d_model=32, num_heads=2, head_dim=16,
                                                 d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                                                 dtype="float32"))
  gin = toy_tasks.collection_model_gin("mhcgl", "ngram", vocab_size)
  ckpt = tmp_path / "run"
  params_io.save_params(str(ckpt), model.init(jax.random.key(0)), model_gin=gin)
  return ckpt, artefacts.directory()


def _argv(ckpt, *extra) -> list[str]:
  return [sys.executable, "-m", "genret_jax.cli", "cgl", "--gin_file=runs/eval.gin",
          f"--gin.CHECKPOINT_PATH=\"{ckpt}\"", "--gin.OUTPUT=\"out/cgl.json\"", *_ARGS, *extra]


def _two_hosts(tmp_path, env, argvs, timeout=120) -> tuple[list[str], list[int]]:
  """Runs argvs[i] as process i of 2, in its own directory tmp_path/host<i> with its own GENRET_CACHE
  tmp_path/cache<i>: the hosts share no files."""
  for i in range(len(argvs)):
    (tmp_path / f"host{i}").mkdir(exist_ok=True)
  return toy_tasks.run_processes(argvs, [tmp_path / f"host{i}" for i in range(len(argvs))],
                                 [dict(env, GENRET_CACHE=str(tmp_path / f"cache{i}")) for i in range(len(argvs))],
                                 timeout)


def _targets_caches(directory) -> list[str]:
  return sorted(n for n in os.listdir(directory) if n.startswith("cgl_targets_"))


def test_two_process_cgl_equals_one_process_and_only_process_0_writes(tmp_path, env, checkpoint):
  ckpt, _, artefacts_name = checkpoint
  caches = [tmp_path / f"cache{i}" / artefacts_name for i in range(2)]
  assert not _targets_caches(caches[0]) and not _targets_caches(caches[1])
  outs, codes = _two_hosts(tmp_path, env, [_argv(ckpt), _argv(ckpt)])
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert "process 1 of 2: scored" in outs[1] and "process 0 wrote" in outs[1], outs[1][-3000:]
  assert "CGL " in outs[0] and "wrote" in outs[0], outs[0][-3000:]
  two = json.loads((tmp_path / "host0" / "out" / "cgl.json").read_text())
  assert two["num_processes"] == 2 and two["num_devices"] == 2
  # Process 0 wrote the output, the negatives and the sampled identifiers; process 1 wrote none of them.
  assert (tmp_path / "host0" / "out" / "negatives_test_n8_s0.npz").exists()
  assert os.listdir(tmp_path / "host1") == []
  assert len(_targets_caches(caches[0])) == 1 and _targets_caches(caches[1]) == []
  # Enough batches that the scores come back in more than one all-gather.
  assert two["scoring"]["num_batches"] > scoring._GATHER_GROUP, two["scoring"]

  # The same job in this process on 2 of its devices: the same numbers.
  one_path = tmp_path / "one" / "cgl.json"
  assert cli.main([*_argv(ckpt)[3:], f"--gin.OUTPUT=\"{one_path}\"", "--gin.genret.cgl_eval_run.mesh_data=2"]) == 0
  one = json.loads(one_path.read_text())
  assert one["num_processes"] == 1 and one["num_devices"] == 2
  assert two["per_query"] == one["per_query"]
  assert two["summary"] == one["summary"]
  assert two["negatives"] == one["negatives"] and two["num_sequences"] == one["num_sequences"]
  assert len(one["per_query"]["query_ids"]) == 4


def test_processes_given_different_jobs_stop(tmp_path, env, checkpoint):
  ckpt = checkpoint[0]
  outs, codes = _two_hosts(tmp_path, env, [_argv(ckpt), _argv(ckpt, "--gin.NUM_NEGATIVES=6")], timeout=60)
  assert codes == [2, 2], outs
  for o in outs:
    assert "genret cgl: error: processes [1] see another job than process 0" in o, o[-3000:]
  assert not (tmp_path / "host0" / "out").exists() and not (tmp_path / "host1" / "out").exists()


_HELPERS = """
import sys
from genret_jax.training import distributed
distributed.initialize("localhost:%s", 2, int(sys.argv[1]))
import jax
import numpy as np
from genret_jax import multihost
from genret_jax.models import partitioning
me = jax.process_index()
print("gathered", multihost.on_every_process(lambda: [me] * (3 + me)))
print("from 0", multihost.from_process_0(lambda: {"negatives": list(range(5 + me))}))
mesh = partitioning.make_mesh(data=-1)
x = jax.make_array_from_callback((4,), partitioning.batch_sharding(mesh, 1), lambda i: np.arange(4.0)[i])
print("host array", multihost.host_array(x).tolist())
print("agreed", multihost.agree(lambda: "same", str, what="x", differ="disagree"))

def step(name, fn):
  try:
    fn()
  except Exception as e:
    print(name, "->", type(e).__name__, str(e).splitlines()[0])
  else:
    print(name, "-> no error")

def fail_on_1():
  if me == 1:
    raise ValueError("bad row")
  return me
step("agree differ", lambda: multihost.agree(lambda: me, str, what="x", differ="see another value"))
step("agree fail", lambda: multihost.agree(fail_on_1, None, what="reading the task"))
step("everywhere fail", lambda: multihost.on_every_process(fail_on_1, what="ranking"))
def fail_on_0():
  raise ValueError("no negatives file")
step("from 0 fail", lambda: multihost.from_process_0(fail_on_0, what="reading the negatives"))
print("done")
"""


def test_a_step_that_fails_or_differs_on_one_process_stops_every_process(tmp_path, env):
  port = toy_tasks.free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _HELPERS % port, str(i)], cwd=_REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=60)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, o in enumerate(outs):
    assert "done" in o, o[-3000:]
    assert "gathered [[0, 0, 0], [1, 1, 1, 1]]" in o
    assert "from 0 {'negatives': [0, 1, 2, 3, 4]}" in o
    assert "host array [0.0, 1.0, 2.0, 3.0]" in o
    assert "agreed same" in o
    assert "agree differ -> InputError processes [1] see another value" in o
    assert ("agree fail -> ValueError bad row" if i == 1 else
            "agree fail -> InputError process 1 failed reading the task: bad row") in o
    assert ("everywhere fail -> ValueError bad row" if i == 1 else
            "everywhere fail -> InputError process 1 failed ranking: bad row") in o
    assert ("from 0 fail -> ValueError no negatives file" if i == 0 else
            "from 0 fail -> InputError process 0 failed reading the negatives: no negatives file") in o
