"""MODEL_DIR / CHECKPOINT_PATH on an object store (gs://): our own files go through `genret_jax.filesystem`.

TensorFlow's in-memory ram:// filesystem stands in for GCS: both are reached only through tf.io.gfile, so a file
written with `open` or `os` instead lands in a local `ram:` directory and the tests see it missing there.
"""

import gzip
import json
import logging
import os
import sys
import uuid

import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import seqio
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
import toy_tasks  # noqa: E402

from genret_jax import atomic_files, filesystem, gin_utils  # noqa: E402
from genret_jax.errors import InputError  # noqa: E402
from genret_jax.models import params_io  # noqa: E402
from genret_jax.scaling import cgl  # noqa: E402
from genret_jax.training import data as data_lib  # noqa: E402


@pytest.fixture
def remote():
  root = f"ram://genret-{uuid.uuid4().hex}"
  yield root
  tf.io.gfile.rmtree(root) if tf.io.gfile.exists(root) else None


@pytest.fixture(autouse=True)
def _no_local_ram_dir(tmp_path, monkeypatch):
  """Runs each test in an empty directory and fails it if anything wrote a local `ram:` path (os on a URL)."""
  monkeypatch.chdir(tmp_path)
  yield
  assert not os.path.exists(tmp_path / "ram:"), sorted(os.listdir(tmp_path / "ram:"))


def test_paths_and_directories(remote):
  assert filesystem.is_remote("gs://bucket/run") and filesystem.is_remote(remote)
  assert not filesystem.is_remote("/tmp/run") and not filesystem.is_remote("file:///tmp/run")
  assert filesystem.abspath("gs://bucket/run/") == "gs://bucket/run"   # os.path.abspath gave <cwd>/gs:/bucket/run
  assert filesystem.abspath("run") == os.path.abspath("run")
  d = f"{remote}/a/b"
  assert not filesystem.exists(d)
  filesystem.makedirs(d)
  assert filesystem.isdir(d) and not filesystem.isfile(d)
  with filesystem.open(f"{d}/x.txt", "w") as f:
    f.write("héllo")
  assert filesystem.isfile(f"{d}/x.txt") and filesystem.getsize(f"{d}/x.txt") == len("héllo".encode())
  with filesystem.open(f"{d}/x.txt") as f:
    assert f.read() == "héllo"
  assert filesystem.listdir(f"{remote}/a") == ["b"]
  assert [(r, files) for r, _, files in filesystem.walk(remote) if files] == [(d, ["x.txt"])]
  with pytest.raises(OSError):
    filesystem.rmdir(d)   # not empty
  filesystem.remove(f"{d}/x.txt")
  filesystem.rmdir(d)
  filesystem.rmtree(f"{remote}/a")
  assert not filesystem.exists(f"{remote}/a")
  filesystem.rmtree(f"{remote}/absent", ignore_errors=True)
  with pytest.raises(ValueError, match="UTF-8"):
    filesystem.open(f"{remote}/y.txt", "w", encoding="latin-1")


def test_atomic_files_upload_whole_or_not_at_all(remote):
  path = f"{remote}/out/metrics.json"
  atomic_files.write_json(path, {"a": 1})
  with filesystem.open(path) as f:
    assert json.load(f) == {"a": 1}
  with pytest.raises(RuntimeError):
    with atomic_files.atomic_open(path) as f:
      f.write('{"a": 2')
      raise RuntimeError("killed mid-write")
  with filesystem.open(path) as f:
    assert json.load(f) == {"a": 1}   # the old file, whole
  with atomic_files.atomic_open(f"{remote}/out/t.json.gz", "wt", opener=gzip.open) as f:
    f.write("zipped")
  with filesystem.open(f"{remote}/out/t.json.gz", "rb") as f:
    assert gzip.decompress(f.read()) == b"zipped"
  with pytest.raises(IsADirectoryError):
    atomic_files.write_text(f"{remote}/out", "x")


def test_vocabulary_record_and_fingerprint_on_remote(remote):
  params_io.save_vocabulary_record(remote, "task", seqio.PassThroughVocabulary(size=64))
  params_io.check_vocabulary(remote, seqio.PassThroughVocabulary(size=64))
  with pytest.raises(InputError, match="vocabulary.json"):
    params_io.check_vocabulary(remote, seqio.PassThroughVocabulary(size=65))
  # Without orbax's metadata file the fingerprint hashes the files' names and sizes (walk + stat on gfile).
  filesystem.makedirs(f"{remote}/params/d")
  atomic_files.write_bytes(f"{remote}/params/d/shard", b"1234")
  first = params_io.params_fingerprint(remote)
  atomic_files.write_bytes(f"{remote}/params/d/shard", b"12345")
  assert params_io.params_fingerprint(remote) != first


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_negatives_round_trip_on_remote(remote, suffix):
  neg = cgl.NegativeSet(np.arange(6, dtype=np.int64).reshape(2, 3), seed=3, num_docs=10, query_ids=("q1", "q2"))
  path = f"{remote}/negatives{suffix}"
  neg.save(path)
  back = cgl.NegativeSet.load(path)
  np.testing.assert_array_equal(back.negatives, neg.negatives)
  assert (back.seed, back.num_docs, back.query_ids) == (3, 10, ("q1", "q2"))


def test_gin_file_on_remote(remote):
  atomic_files.write_text(f"{remote}/model.gin", "MODEL_DIR = 'from-remote'\n")
  gin_utils.parse_gin([f"{remote}/model.gin"], [])
  assert gin_utils.config_value("MODEL_DIR") == "from-remote"
  with pytest.raises(InputError, match="gin file not found"):
    gin_utils.parse_gin([f"{remote}/absent.gin"], [])


def test_input_position_saved_and_restored_on_remote(remote):
  ds = tf.data.Dataset.range(100).shuffle(50, seed=1).batch(4).map(lambda x: {"x": x})
  batches = data_lib.ResumableBatches(ds)
  for _ in range(3):
    next(batches)
  assert batches.save(f"{remote}/checkpoints_data/3/shard_0-of-1.process_0")
  expected = [next(batches)["x"] for _ in range(2)]
  again = data_lib.ResumableBatches(ds)
  assert again.restore(f"{remote}/checkpoints_data/3/shard_0-of-1.process_0")
  np.testing.assert_array_equal([next(again)["x"] for _ in range(2)], expected)
  assert not data_lib.ResumableBatches(ds).restore(f"{remote}/checkpoints_data/9/shard_0-of-1.process_0")


def _batch(b, n=3):
  from genret_jax.retrieval.run_files import QueryResult
  return [QueryResult(f"q{b}-{i}", [f"d{b}{i}", f"d{i}x"], [-0.5 * i, -1.0 - i], {"stats": {"n": i}})
          for i in range(n)]


def test_results_store_on_remote_writes_parts_and_merges_them(remote, tmp_path):
  """On an object store each batch is its own object until the job ends; a restart resumes from them; the merged
  directory holds the bytes a local job writes."""
  from genret_jax.retrieval import run_files as rf
  calls = []

  def compute(b):
    calls.append(b)
    if len(calls) == 3:
      raise KeyboardInterrupt   # preempted in batch 2
    return _batch(b)

  out = f"{remote}/retrieve"
  with pytest.raises(KeyboardInterrupt):
    rf.process_batches(rf.ResultsStore(out, meta={"beam": 5}), range(4), compute, progress=False)
  assert filesystem.listdir(f"{out}/{rf.PARTS_DIR}") == ["batch-00000000.jsonl", "batch-00000001.jsonl"]
  assert not filesystem.exists(f"{out}/{rf.RESULTS_FILE}")
  with pytest.raises(InputError, match="beam"):
    rf.ResultsStore(out, meta={"beam": 20})
  store = rf.ResultsStore(out, meta={"beam": 5})
  assert store.completed_batches == {0, 1}
  calls.clear()
  assert rf.process_batches(store, range(4), compute, progress=False)["batches_computed"] == 2 and calls == [2, 3]
  store.consolidate()
  store.write_run("t")
  local = rf.ResultsStore(str(tmp_path / "local"), meta={"beam": 5})
  rf.process_batches(local, range(4), _batch, progress=False)
  local.write_run("t")
  for name in (rf.RESULTS_FILE, rf.RUN_FILE, rf.META_FILE):
    with filesystem.open(f"{out}/{name}", "rb") as f:
      assert f.read() == (tmp_path / "local" / name).read_bytes(), name
  assert sorted(filesystem.listdir(out)) == [rf.META_FILE, rf.RESULTS_FILE, rf.RUN_FILE]
  again = rf.ResultsStore(out, meta={"beam": 5})   # a finished job reopened: everything done, from results.jsonl
  assert again.completed_batches == {0, 1, 2, 3} and again.results() == local.results()


def test_results_store_on_remote_after_an_interrupted_merge(remote):
  """Killed after results.jsonl was uploaded but before the parts were removed: the parts count as merged (and are
  removed by the next merge); a part that disagrees with results.jsonl, or a cut one, is an error naming it."""
  from genret_jax.retrieval import run_files as rf
  out = f"{remote}/retrieve"
  store = rf.ResultsStore(out)
  for b in range(2):
    store.write_batch(b, _batch(b))
  parts = {n: filesystem.open(f"{out}/{rf.PARTS_DIR}/{n}", "rb").read() for n in filesystem.listdir(
      f"{out}/{rf.PARTS_DIR}")}
  store.consolidate()
  for n, data in parts.items():   # as if the removal never ran
    _replace(f"{out}/{rf.PARTS_DIR}/{n}", data)
  store = rf.ResultsStore(out)
  assert store.completed_batches == {0, 1} and len(store.results()) == 6
  store.consolidate()
  assert not filesystem.exists(f"{out}/{rf.PARTS_DIR}") and len(rf.ResultsStore(out).results()) == 6
  bad = f"{out}/{rf.PARTS_DIR}/batch-00000001.jsonl"
  _replace(bad, parts["batch-00000000.jsonl"])
  with pytest.raises(InputError, match="another batch"):
    rf.ResultsStore(out)
  _replace(bad, parts["batch-00000001.jsonl"].replace(b'"q1-0"', b'"other"'))
  with pytest.raises(InputError, match="batch-00000001.jsonl.*differs"):
    rf.ResultsStore(out)
  cut = f"{out}/{rf.PARTS_DIR}/batch-00000002.jsonl"
  filesystem.remove(bad)
  _replace(cut, b"\n".join(_lines(2)[:2]))
  with pytest.raises(InputError, match="batch-00000002.jsonl"):
    rf.ResultsStore(out)
  assert rf.ResultsStore(out, overwrite=True).completed_batches == set()
  assert filesystem.listdir(out) == [rf.META_FILE]


def _replace(path, data):
  """ram:// appends to an object written again (GCS replaces it): the tests remove it first."""
  if filesystem.exists(path):
    filesystem.remove(path)
  atomic_files.write_bytes(path, data)


def _lines(b):
  import json as json_
  return [json_.dumps(dict(batch=b, pos=i, of=3, query_id=r.query_id, doc_ids=r.doc_ids, scores=r.scores)).encode()
          for i, r in enumerate(_batch(b))]


def _orbax_on_local_disk(monkeypatch, local_root):
  """orbax and tensorstore reach gs:// themselves but know no ram://: their directories under the remote root
  are mapped to a local one, so the test sees where everything else goes."""
  def local(path):
    path = os.fspath(path)
    return os.path.join(local_root, path.split("://", 1)[1]) if path.startswith("ram://") else path

  real_manager, real_standard = ocp.CheckpointManager, ocp.StandardCheckpointer

  class Standard(real_standard):
    def save(self, path, *a, **k):
      return super().save(local(path), *a, **k)

  monkeypatch.setattr(ocp, "CheckpointManager", lambda directory, **k: real_manager(local(directory), **k))
  monkeypatch.setattr(ocp, "StandardCheckpointer", Standard)


def test_training_with_a_remote_model_dir_writes_its_own_files_there(remote, tmp_path, monkeypatch, caplog):
  """Every file the trainer writes itself (config, truncation report, TensorBoard events, input positions,
  model.gin, vocabulary record) lands under MODEL_DIR on the store, a restart finds its input position there,
  and nothing is written to a local `ram:` directory (the autouse fixture)."""
  from test_trainer import _train, t5
  _orbax_on_local_disk(monkeypatch, str(tmp_path / "orbax"))
  sgd = lambda: optax.sgd(0.5)
  whole = _train(t5(), tmp_path / "whole", 4, optimizer=sgd(), keep_checkpoints=1)
  _train(t5(), remote, 4, optimizer=sgd(), keep_checkpoints=1, stop_after_steps=2, write_config=True)
  assert {"config.gin", "truncation.json", "train", "checkpoints_data"} <= set(filesystem.listdir(remote))
  assert filesystem.listdir(f"{remote}/train")   # event files
  assert filesystem.exists(f"{remote}/checkpoints_data/2/shard_0-of-1.process_0/iterator.index")
  with caplog.at_level(logging.INFO):
    again = _train(t5(), remote, 4, optimizer=sgd(), keep_checkpoints=1)
  assert again.resumed_from == 2 and "input pipeline restored at batch 2" in caplog.text
  np.testing.assert_array_equal(again.losses, whole.losses[2:])
  assert filesystem.listdir(f"{remote}/checkpoints_data") == ["4"]   # step 2's position pruned on the store
  assert {"model.gin", "vocabulary.json"} <= set(filesystem.listdir(remote))
  assert os.path.isdir(tmp_path / "orbax" / remote.split("://")[1] / "checkpoints" / "4")


def test_hf_export_to_and_import_from_remote(remote, tmp_path):
  """`convert-hf --to_hf --out gs://...`: the exported config.json and model.safetensors on the store are the bytes
  of a local export (both were written with pathlib, so a URL became a local `gs:` directory); `--hf_dir gs://...`
  imports them back."""
  import jax

  from genret_jax import cli
  from genret_jax.models import model_api
  from genret_jax.models.t5 import T5Config
  model = model_api.EncoderDecoderModel(T5Config(vocab_size=128, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                 num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))
  ckpt = str(tmp_path / "ckpt")
  params_io.save_params(ckpt, model.init(jax.random.key(0)), model_gin=toy_tasks.tiny_t5_model_gin(128)
                        + "models.get_model.model = %MODEL\n")
  for out in (str(tmp_path / "hf"), f"{remote}/hf"):
    assert cli.main(["convert-hf", "--to_hf", "--checkpoint", ckpt, "--out", out]) == 0
  for name in ("config.json", "model.safetensors"):
    with filesystem.open(f"{remote}/hf/{name}", "rb") as f:
      assert f.read() == (tmp_path / "hf" / name).read_bytes(), name
  assert sorted(filesystem.listdir(f"{remote}/hf")) == ["config.json", "model.safetensors"]
  # And back from the store (`--hf_dir gs://...`): the same params; a bad file there is named by its URL.
  assert cli.main(["convert-hf", "--hf_dir", f"{remote}/hf", "--out", str(tmp_path / "back"), "--dtype",
                   "float32"]) == 0
  jax.tree.map(np.testing.assert_array_equal, params_io.restore_params(str(tmp_path / "back")),
               params_io.restore_params(ckpt))
  atomic_files.write_text(f"{remote}/bad/config.json", "{not json")
  with pytest.raises(InputError, match=f"^{remote}/bad/config.json:1: invalid JSON"):
    hf_convert_run(["--hf_dir", f"{remote}/bad", "--out", str(tmp_path / "x")])
  with pytest.raises(InputError, match=f"^{remote}/none: no such directory"):
    hf_convert_run(["--hf_dir", f"{remote}/none", "--out", str(tmp_path / "x")])


def hf_convert_run(argv):
  import argparse

  from genret_jax.models import hf_convert
  parser = argparse.ArgumentParser()
  hf_convert.add_arguments(parser)
  return hf_convert.run(parser.parse_args(argv))


def test_lines_from_remote_plain_and_gzip(remote):
  """The line reader under every corpus, results.csv and id file reads URLs, gzip included, with line numbers."""
  from genret_jax.corpora.lines import iter_lines
  atomic_files.write_bytes(f"{remote}/a.tsv", "x\tñ\r\ny\n".encode())
  atomic_files.write_bytes(f"{remote}/a.tsv.gz", gzip.compress(b"one\ntwo\n\xff\n"))
  assert list(iter_lines(f"{remote}/a.tsv")) == [(1, "x\tñ"), (2, "y")]
  with pytest.raises(InputError, match=r"a.tsv.gz:3: not valid UTF-8"):
    list(iter_lines(f"{remote}/a.tsv.gz"))
  with pytest.raises(InputError, match="file not found"):
    list(iter_lines(f"{remote}/none.tsv"))
