"""`genret retrieve` as fresh processes: two on localhost (jax.distributed over gloo, one CPU device each) on a
2-device `data` mesh, like tests/test_multihost.py does for training, and one plain process.

* Each host holds half of every query batch, and the last batch (10 queries at 4 per batch) has its 2 real rows
  on process 0 and only padding on process 1. Every process decodes every batch and ranks every other query of
  it (docid lookup or n-gram scoring), process 0 alone writes: each query exactly once, the same bytes as one
  process on a 2-device mesh. (Each process fetched its decoded batch with device_get, which refuses rows on
  another host; and each appended to results.jsonl. Then process 0 ranked every query alone.)
* A restart of both processes after a crash mid-write resumes where process 0's file ends, on both hosts, and
  writes the same bytes as the uninterrupted run.
* Processes that see different jobs (here: another max_queries) stop with one line each instead of waiting for
  each other forever.
* A fresh process accepts `--gin.RetrievalConfig.*` (it was "no configurable matching" unless some import had
  registered it).
"""

import json
import os
import subprocess
import sys

import jax
import pytest
import seqio

import toy_tasks
from genret_jax import cli
from genret_jax.models import model_api, params_io
from genret_jax.models.t5 import T5Config

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)
_ARGS = ["--gin.BEAM_SIZE=3", "--gin.INFER_BATCH_SIZE=4", "--gin.genret.retrieve_run.max_queries=10",
         "--gin.genret.retrieve_run.progress=False"]


@pytest.fixture
def env(tmp_path, monkeypatch):
  monkeypatch.setenv("GENRET_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("GENRET_REGISTER_DEFAULT_TASKS", "0")
  return dict(os.environ, PYTHONPATH=os.pathsep.join([_TESTS, os.environ.get("PYTHONPATH", "")]),
              JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _checkpoint(tmp_path, scheme="naive"):
  """A tiny random T5 whose model.gin registers its task itself (the child processes import nothing else); the
  task's artefacts and retrieval index are built here, so the processes only load them."""
  import tasks
  from genret_jax.retrieval import run
  names = tasks.register_collection_tasks("mhretrieve", "default", scheme, vocab_size=300)
  vocab_size = seqio.get_mixture_or_task(names["retrieval"]).output_features["targets"].vocabulary.vocab_size
  run.build_task_index(names["retrieval"], vocab_size)
  model = model_api.EncoderDecoderModel(T5Config(vocab_size=vocab_size, d_model=32, num_heads=2, head_dim=16,
                                                 d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                                                 dtype="float32"))
  gin = toy_tasks.collection_model_gin("mhretrieve", scheme, vocab_size)
  ckpt = tmp_path / "run"
  params_io.save_params(str(ckpt), model.init(jax.random.key(0)), model_gin=gin)
  test_ids = [q.query_id for q in tasks.artefacts_for(names["retrieval"]).query_splits()["test"][:10]]
  return ckpt, test_ids


def _argv(ckpt, out, *extra) -> list[str]:
  return [sys.executable, "-m", "genret_jax.cli", "retrieve", "--gin_file=runs/infer.gin",
          f"--gin.CHECKPOINT_PATH=\"{ckpt}\"", f"--gin.OUTPUT_DIR=\"{out}\"", *_ARGS, *extra]


def _two_processes(env, ckpt, out, extra=((), ()), timeout=120) -> list[str]:
  return toy_tasks.run_processes([_argv(ckpt, out, *extra[i]) for i in range(2)], [_REPO] * 2, [env] * 2,
                                 timeout)[0]


@pytest.mark.parametrize("scheme", ["naive", "ngram"])
def test_two_process_retrieve_writes_once_and_resumes(tmp_path, env, scheme):
  ckpt, test_ids = _checkpoint(tmp_path, scheme)
  out = tmp_path / "out"
  outs = _two_processes(env, ckpt, out)
  assert "retrieved; metrics" in outs[0], outs[0][-3000:]
  # Each process ranks every other query of each batch (4 + 4 + 2 rows): process 1 ranks rows 1, 3 of each.
  assert "process 1 of 2: decoded 3 batches, ranked 5 queries; process 0 wrote" in outs[1], outs[1][-3000:]
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert [r["query_id"] for r in rows] == test_ids   # each once, no padding row
  assert sorted({line.split()[0] for line in (out / "run.trec").read_text().splitlines()}) == sorted(test_ids)
  assert json.loads((out / "metrics.json").read_text())["num_queries"] == 10
  first = {name: (out / name).read_bytes() for name in ("results.jsonl", "run.trec")}

  # The same job in this process on 2 of its devices: the same bytes.
  one = tmp_path / "one"
  assert cli.main([*_argv(ckpt, one)[3:], "--gin.genret.retrieve_run.mesh_data=2"]) == 0
  assert all((one / name).read_bytes() == data for name, data in first.items())

  # Both hosts restart after process 0 was killed halfway through a line of batch 1.
  lines = first["results.jsonl"].split(b"\n")
  (out / "results.jsonl").write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:len(lines[5]) // 2])
  os.remove(out / "run.trec")
  outs = _two_processes(env, ckpt, out)
  assert "retrieved; metrics" in outs[0], outs[0][-3000:]
  assert "process 1 of 2: decoded 2 batches, ranked 3 queries" in outs[1], outs[1][-3000:]
  assert all((out / name).read_bytes() == data for name, data in first.items())
  assert json.loads((out / "metrics.json").read_text())["store"]["partial_lines_dropped"] == 2


def test_processes_that_see_different_jobs_stop(tmp_path, env):
  ckpt, _ = _checkpoint(tmp_path)
  # Without the check each waited for the other forever (process 0 broadcast 3 batches, process 1 expected 2).
  outs = _two_processes(env, ckpt, tmp_path / "out", extra=((), ("--gin.genret.retrieve_run.max_queries=6",)),
                        timeout=60)
  for o in outs:
    assert "genret retrieve: error: processes [1] see another job than process 0" in o, o[-3000:]
  assert not (tmp_path / "out").exists()


def test_fresh_process_takes_retrieval_config_bindings(tmp_path, env):
  ckpt, _ = _checkpoint(tmp_path)
  out = tmp_path / "out"
  p = subprocess.run(_argv(ckpt, out, "--gin.RetrievalConfig.hits=2", "--gin.genret.retrieve_run.max_queries=4"),
                     cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
  assert p.returncode == 0, p.stdout[-3000:]
  assert json.loads((out / "meta.json").read_text())["retrieval_config"]["hits"] == 2
  assert max(len(json.loads(line)["doc_ids"]) for line in (out / "results.jsonl").read_text().splitlines()) <= 2

