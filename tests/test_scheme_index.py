"""The retrieval index cache (`retrieval/scheme_index.py`): what a job builds is saved and what a later job loads
is the same constraint and host structures, without building; shards are saved and loaded too; a cache built for
something else is rebuilt; `genret build-index --task` prebuilds what `genret retrieve` then loads."""

import json
import logging

import jax
import numpy as np
import pytest
import seqio

import toy_tasks
from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.retrieval import scheme_index as si_lib
from genret_jax.retrieval.pipeline import RetrievalConfig, Retriever
from genret_jax.retrieval.scheme_index import build_scheme_index


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
  monkeypatch.setenv("GENRET_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("GENRET_REGISTER_DEFAULT_TASKS", "0")
  return tmp_path


def _task(name: str, scheme: str):
  # A name per test: artefacts (their cache directory included) are memoized per process.
  import tasks
  names = tasks.register_collection_tasks(f"schemeindex_{name}", "default", scheme, vocab_size=300)
  task = seqio.get_mixture_or_task(names["retrieval"])
  artefacts = tasks.artefacts_for(task.name)
  return task, artefacts, artefacts.identifier_scheme(), task.output_features["targets"].vocabulary


def _no_build(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("built instead of loaded")
  monkeypatch.setattr(SuffixArrayIndex, "build", classmethod(refuse))


def _same_leaves(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_ngram_index_and_shards_are_saved_then_loaded(cache_env, monkeypatch, caplog):
  _, artefacts, scheme, vocab = _task("ngram", "ngram")
  v = vocab.vocab_size
  cache = artefacts.retrieval_index_dir(v)
  built = build_scheme_index(scheme, vocab, v, cache_dir=cache)
  assert built.source == "built" and (cache_env / "cache").exists()
  for d in (0, 7, scheme.num_docs - 1):   # batched tokenisation = the vocabulary's own encode
    assert built.ngram_index.doc_tokens(d).tolist() == list(vocab.encode(scheme.document_string(d)))
  sharded = build_scheme_index(scheme, vocab, v, index_shards=3, cache_dir=cache)   # host index loaded, shards built
  assert sharded.source == "loaded"
  with monkeypatch.context() as m:
    _no_build(m)
    loaded = build_scheme_index(scheme, vocab, v, cache_dir=cache)
    loaded_sharded = build_scheme_index(scheme, vocab, v, index_shards=3, cache_dir=cache)
  assert loaded.source == loaded_sharded.source == "loaded"
  for name in ("tokens", "sa", "doc_starts"):
    assert np.array_equal(getattr(loaded.ngram_index, name), getattr(built.ngram_index, name))
  _same_leaves(loaded.constraint, built.constraint)
  _same_leaves(loaded_sharded.constraint, sharded.constraint)
  assert loaded_sharded.constraint.num_shards == 3
  # An index of 3 shards handed to a Retriever configured for 1 is refused, not used with the other count.
  with pytest.raises(si_lib.InputError, match="index_shards: the scheme index given has 3 suffix-array shard"):
    Retriever(None, None, scheme, vocab, artefacts.collection(), RetrievalConfig(), scheme_index=loaded_sharded)
  # Built for another model vocabulary (the separator id): rebuilt, with a warning naming the difference.
  meta_path = f"{cache}/meta.json"
  meta = json.load(open(meta_path))
  json.dump({**meta, "vocab_size": v + 1}, open(meta_path, "w"))
  with caplog.at_level(logging.WARNING):
    rebuilt = build_scheme_index(scheme, vocab, v, index_shards=3, cache_dir=cache)
  assert rebuilt.source == "built" and "rebuilding" in caplog.text and "vocab_size" in caplog.text
  assert json.load(open(meta_path))["vocab_size"] == v
  _same_leaves(rebuilt.constraint, sharded.constraint)


def test_docid_index_is_saved_then_loaded(cache_env):
  _, artefacts, scheme, vocab = _task("naive", "naive")
  v = vocab.vocab_size + 5   # a model vocabulary padded past the SentencePiece one
  cache = artefacts.retrieval_index_dir(v)
  built = build_scheme_index(scheme, vocab, v, cache_dir=cache)
  loaded = build_scheme_index(scheme, vocab, v, cache_dir=cache)
  assert (built.source, loaded.source) == ("built", "loaded")
  first = scheme.doc_identifiers(0)[0]
  assert 0 in built.lookup.lookup(list(vocab.encode(first)))   # batched tokenisation = the vocabulary's encode
  _same_leaves(loaded.constraint, built.constraint)
  assert loaded.lookup._table == built.lookup._table and len(loaded.lookup) == scheme.num_docs
  assert (loaded.max_identifier_len, loaded.num_tokens) == (built.max_identifier_len, built.num_tokens)
  assert int(loaded.constraint.vocab_size) == v
  with pytest.raises(si_lib.InputError, match="index_shards"):
    build_scheme_index(scheme, vocab, v, index_shards=2, cache_dir=cache)
  with pytest.raises(si_lib.InputError, match="config key vocab_size: the model's vocabulary"):
    build_scheme_index(scheme, vocab, vocab.vocab_size - 1)


def test_build_index_task_then_retrieve_loads_it(cache_env, monkeypatch, capsys):
  from genret_jax import cli
  from genret_jax.models import model_api, params_io
  from genret_jax.models.t5 import T5Config
  task, artefacts, _, vocab = _task("cli", "ngram")
  v = vocab.vocab_size
  ckpt = cache_env / "run"
  gin = toy_tasks.tiny_t5_model_gin(v) + f"""models.get_model.model = %MODEL
MIXTURE_OR_TASK_NAME = "{task.name}"
TASK_FEATURE_LENGTHS = {{"inputs": 32, "targets": 16}}
"""
  model = model_api.EncoderDecoderModel(T5Config(vocab_size=v, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                 num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))
  params_io.save_params(str(ckpt), model.init(jax.random.key(0)), model_gin=gin)

  assert cli.main(["build-index"]) == 2   # nothing to build from: one line naming the options
  assert "--task" in capsys.readouterr().err
  assert cli.main(["build-index", f"--task={task.name}"]) == 2
  assert "build_index.vocab_size" in capsys.readouterr().err
  assert cli.main(["build-index", "--task=no_such_task", "--vocab_size=300"]) == 2
  assert "build_index.task: unknown seqio task or mixture 'no_such_task'" in capsys.readouterr().err
  (cache_env / "docs.txt").write_text("5 6 7\n")
  assert cli.main(["build-index", f"--tokens_file={cache_env / 'docs.txt'}", f"--output_dir={cache_env / 'sa'}",
                   "--index_shards=2"]) == 2   # shards are saved for a task's index only: not silently ignored
  assert "build_index.index_shards" in capsys.readouterr().err
  # Task and vocabulary size from the run's model.gin.
  assert cli.main(["build-index", f"--gin_file={ckpt}/model.gin", "--index_shards=2"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["source"] == "built" and report["kind"] == "suffix_array" and report["index_shards"] == 2
  assert report["output_dir"] == artefacts.retrieval_index_dir(v)
  assert report["indexed_tokens"] > 0 and 0 < report["bytes_per_token"] < 16
  assert report["device_nbytes"] > 0 and report["device_bytes_per_token"] > 0

  _no_build(monkeypatch)   # retrieve must load the host index and the two shards
  out = cache_env / "out"
  argv = ["retrieve", "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH=\"{ckpt}\"", "--gin.BEAM_SIZE=2",
          f"--gin.OUTPUT_DIR=\"{out}\"", "--gin.INDEX_SHARDS=2", "--gin.INFER_BATCH_SIZE=8",
          "--gin.genret.retrieve_run.max_queries=4", "--gin.genret.retrieve_run.progress=False"]
  assert cli.main(argv) == 0
  assert (out / "run.trec").read_text()
  # A batch that does not split over the 8 (simulated) data devices: one line naming the key.
  assert cli.main([*argv[:6], "--gin.INFER_BATCH_SIZE=4", *argv[7:]]) == 2
  assert "INFER_BATCH_SIZE" in capsys.readouterr().err


_CONCURRENT_JOB = """
import hashlib, sys
import jax, numpy as np
from genret_jax.retrieval.scheme_index import build_scheme_index

class Scheme:   # n-gram scheme stand-in: 40 documents of letters
  is_ngram, num_docs = True, 40
  def document_string(self, d):
    return " ".join("abcdefgh"[(d * 7 + i * 3) % 8] * (1 + i % 3) for i in range(20 + d))

class Vocab:
  vocab_size = 43
  def encode(self, text):
    return [3 + ord(c) % 40 for c in text]

if len(sys.argv) > 2:   # start together: wait for the go file once everything is imported
  import os, time
  print("ready", flush=True)
  while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
si = build_scheme_index(Scheme(), Vocab(), 64, index_shards=2, cache_dir=sys.argv[1])
digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(si.constraint))).hexdigest()
print(si.source, digest)
"""


def test_jobs_sharing_a_cache_build_it_concurrently(tmp_path):
  """Several hosts' jobs starting at once on one shared cache (here: a stale one) all finish with the same
  constraint, and leave one valid cache behind."""
  import subprocess
  import sys
  cache = tmp_path / "retrieval_index_v64"
  cache.mkdir()
  (cache / "meta.json").write_text(json.dumps({"format_version": si_lib.FORMAT_VERSION, "kind": "ngram",
                                               "vocab_size": 65, "num_docs": 40}))
  go = tmp_path.parent / f"{tmp_path.name}_go"
  jobs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_JOB, str(cache), str(go)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(3)]
  assert [job.stdout.readline().strip() for job in jobs] == ["ready"] * 3
  go.touch()
  outs = [job.communicate(timeout=300) for job in jobs]
  assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in outs]
  digests = {out.split()[-1] for out, _ in outs}
  assert len(digests) == 1
  again = subprocess.run([sys.executable, "-c", _CONCURRENT_JOB, str(cache)], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
  assert again == ["loaded", digests.pop()]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["retrieval_index_v64"]   # no temporary left behind
