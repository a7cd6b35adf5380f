"""`genret retrieve` through runs/infer.gin on the embedded default corpus with a random tiny T5: the suffix array
split into device shards (`INDEX_SHARDS`, placed over a 2-way `model` mesh axis) gives the same run file as one
shard; a docid scheme refuses shards; a restart resumes only where nothing that changes results changed and
writes the bytes of an uninterrupted run; bad settings, an empty split and cut queries are one line or
reported."""

import json

import jax
import pytest
import seqio

import toy_tasks
from genret_jax import cli
from genret_jax.models import model_api, params_io


def _checkpoint(tmp_path, scheme: str):
  import tasks
  names = tasks.register_collection_tasks(f"retrievecmd_{scheme}", "default", scheme, vocab_size=300)
  vocab_size = seqio.get_mixture_or_task(names["retrieval"]).output_features["targets"].vocabulary.vocab_size
  from genret_jax.models.t5 import T5Config
  model = model_api.EncoderDecoderModel(T5Config(vocab_size=vocab_size, d_model=32, num_heads=2, head_dim=16,
                                                 d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                                                 dtype="float32"))
  ckpt = tmp_path / f"run_{scheme}"
  gin = toy_tasks.tiny_t5_model_gin(vocab_size) + f"""models.get_model.model = %MODEL
MIXTURE_OR_TASK_NAME = "{names['retrieval']}"
TASK_FEATURE_LENGTHS = {{"inputs": 32, "targets": 16}}
"""
  params_io.save_params(str(ckpt), model.init(jax.random.key(0)), model_gin=gin)
  return ckpt


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("GENRET_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("GENRET_REGISTER_DEFAULT_TASKS", "0")


def _argv(ckpt, *bindings) -> list[str]:
  """`genret retrieve` through runs/infer.gin on `ckpt`, no progress bar, plus `bindings`."""
  return ["retrieve", "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH=\"{ckpt}\"",
          "--gin.genret.retrieve_run.progress=False", *bindings]


def test_retrieve_with_index_shards_matches_one_shard(tmp_path):
  ckpt = _checkpoint(tmp_path, "ngram")
  runs = {}
  for shards in (1, 4):   # the same 2-way model axis for both: sharded params change float sums
    out = tmp_path / f"out{shards}"
    argv = _argv(ckpt, "--gin.BEAM_SIZE=4", f"--gin.OUTPUT_DIR=\"{out}\"", f"--gin.INDEX_SHARDS={shards}",
                 "--gin.INFER_BATCH_SIZE=8", "--gin.genret.retrieve_run.mesh_model=2",
                 "--gin.genret.retrieve_run.max_queries=8")
    assert cli.main(argv) == 0
    runs[shards] = (out / "run.trec").read_text()
  assert runs[1] and runs[1] == runs[4]


def test_retrieve_refuses_shards_for_a_docid_scheme(tmp_path, capsys):
  ckpt = _checkpoint(tmp_path, "naive")
  assert cli.main(_argv(ckpt, "--gin.INDEX_SHARDS=2", "--gin.genret.retrieve_run.max_queries=2")) == 2
  assert "n-gram identifiers" in capsys.readouterr().err
  assert cli.main(_argv(ckpt, "--gin.INDEX_SHARDS=0", "--gin.genret.retrieve_run.max_queries=2")) == 2
  assert "RetrievalConfig.index_shards: must be an integer >= 1" in capsys.readouterr().err


def test_restart_with_another_setting_or_other_params_is_refused(tmp_path, capsys):
  """A restarted job appends to the batches already written only when nothing that changes results differs:
  the retrieval and n-gram scoring settings, the inputs length and the parameters themselves (a further-trained
  checkpoint in the same directory) are part of the job's identity."""
  ckpt = _checkpoint(tmp_path, "naive")
  argv = _argv(ckpt, "--gin.BEAM_SIZE=2", "--gin.genret.retrieve_run.max_queries=4")
  assert cli.main(argv) == 0
  assert cli.main(argv) == 0   # resumed: every batch already written
  capsys.readouterr()
  assert cli.main([*argv, "--gin.RetrievalConfig.hits=5"]) == 2
  assert "'retrieval_config'" in capsys.readouterr().err
  assert cli.main([*argv, "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"]) == 2
  assert "task_feature_lengths" in capsys.readouterr().err
  params = params_io.restore_params(str(ckpt))
  params_io.save_params(str(ckpt), params)   # the same directory, saved again (as further training would)
  assert cli.main(argv) == 2
  assert "differs in ['params']" in capsys.readouterr().err


def test_interrupted_job_resumes_to_the_same_bytes(tmp_path, monkeypatch):
  """Preempted after two batches, then restarted after a crash that left half a line of the third: the restart
  redoes only the missing batches and writes the bytes of an uninterrupted run."""
  from genret_jax.retrieval import pipeline
  ckpt = _checkpoint(tmp_path, "naive")
  argv = _argv(ckpt, "--gin.BEAM_SIZE=3", "--gin.INFER_BATCH_SIZE=8", "--gin.genret.retrieve_run.max_queries=30")
  clean, cut = tmp_path / "clean", tmp_path / "cut"
  assert cli.main([*argv, f"--gin.OUTPUT_DIR=\"{clean}\""]) == 0
  real, calls = pipeline.Retriever.decode, []

  def preempted(self, *args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt   # as a SIGINT from the scheduler
    return real(self, *args)

  monkeypatch.setattr(pipeline.Retriever, "decode", preempted)
  with pytest.raises(KeyboardInterrupt):
    cli.main([*argv, f"--gin.OUTPUT_DIR=\"{cut}\""])
  written = (cut / "results.jsonl").read_bytes()
  assert written.count(b"\n") == 16 and not (cut / "run.trec").exists()
  third = (clean / "results.jsonl").read_bytes().split(b"\n")[16]
  (cut / "results.jsonl").write_bytes(written + third[:len(third) // 2])
  monkeypatch.setattr(pipeline.Retriever, "decode", real)
  calls.clear()
  assert cli.main([*argv, f"--gin.OUTPUT_DIR=\"{cut}\""]) == 0
  for name in ("results.jsonl", "run.trec"):
    assert (cut / name).read_bytes() == (clean / name).read_bytes()
  a, b = (json.loads((d / "metrics.json").read_text()) for d in (clean, cut))
  assert a["metrics"] == b["metrics"] and b["store"]["partial_lines_dropped"] == 1


def test_output_dir_on_an_object_store_resumes_to_the_bytes_of_a_local_run(tmp_path, monkeypatch):
  """OUTPUT_DIR on an object store (ram:// standing in for gs://): preempted after two batches, the restart
  finds them as part objects and redoes only the rest; the finished directory holds the bytes a local job
  writes, and nothing went to a local `ram:` directory."""
  import uuid

  from genret_jax import filesystem
  from genret_jax.retrieval import pipeline
  monkeypatch.chdir(tmp_path)
  ckpt = _checkpoint(tmp_path, "naive")
  argv = _argv(ckpt, "--gin.BEAM_SIZE=3", "--gin.INFER_BATCH_SIZE=8", "--gin.genret.retrieve_run.max_queries=30")
  local, remote = tmp_path / "local", f"ram://genret-{uuid.uuid4().hex}/retrieve"
  assert cli.main([*argv, f"--gin.OUTPUT_DIR=\"{local}\""]) == 0
  real, calls = pipeline.Retriever.decode, []

  def preempted(self, *args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(self, *args)

  monkeypatch.setattr(pipeline.Retriever, "decode", preempted)
  with pytest.raises(KeyboardInterrupt):
    cli.main([*argv, f"--gin.OUTPUT_DIR=\"{remote}\""])
  assert len(filesystem.listdir(f"{remote}/results.parts")) == 2
  monkeypatch.setattr(pipeline.Retriever, "decode", real)
  assert cli.main([*argv, f"--gin.OUTPUT_DIR=\"{remote}\""]) == 0
  for name in ("results.jsonl", "run.trec", "meta.json"):
    with filesystem.open(f"{remote}/{name}", "rb") as f:
      assert f.read() == (local / name).read_bytes(), name
  with filesystem.open(f"{remote}/metrics.json") as f:
    got = json.load(f)
  assert got["metrics"] == json.loads((local / "metrics.json").read_text())["metrics"]
  assert got["store"]["parts_merged"] == 4 and "results.parts" not in filesystem.listdir(remote)
  assert not (tmp_path / "ram:").exists()


def test_bad_settings_are_one_line_naming_the_key(tmp_path, capsys):
  """BEAM_SIZE and INFER_BATCH_SIZE are named as set and refused before the checkpoint is read (minutes for a
  large model; here the params are missing); max_queries 0 ran every query and -1 all but the last one."""
  ckpt = _checkpoint(tmp_path, "naive")
  (ckpt / "params").rename(ckpt / "params_moved")
  for binding, key in (("--gin.BEAM_SIZE=0", "BEAM_SIZE"), ("--gin.BEAM_SIZE=-2", "BEAM_SIZE"),
                       ("--gin.INFER_BATCH_SIZE=0", "INFER_BATCH_SIZE"),
                       ("--gin.genret.retrieve_run.max_queries=0", "genret.retrieve_run.max_queries"),
                       ("--gin.genret.retrieve_run.max_queries=-1", "genret.retrieve_run.max_queries")):
    assert cli.main(_argv(ckpt, binding)) == 2
    err = capsys.readouterr().err
    assert f"error: config key {key}: must be an integer >= 1" in err and len(err.splitlines()) == 1, err
  assert cli.main(_argv(ckpt)) == 2
  assert "no parameter checkpoint" in capsys.readouterr().err
  assert cli.main(_argv(ckpt, "--gin.SPLIT=\"dev\"")) == 2
  assert "config key SPLIT: split 'dev' has no queries" in capsys.readouterr().err


def test_empty_split_is_refused(tmp_path, capsys):
  """Three judged queries split 80/10/10 leave no test query: the job wrote an empty run and metrics {} and
  exited 0."""
  import tasks
  corpus = tmp_path / "tiny"
  (corpus / "qrels").mkdir(parents=True)
  (corpus / "corpus.jsonl").write_text("".join(
      json.dumps({"_id": f"d{i}", "title": "", "text": f"document {i} about {w}"}) + "\n"
      for i, w in enumerate(["cats", "dogs", "ships", "birds"])))
  (corpus / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": w}) + "\n"
                                                for i, w in enumerate(["cats", "dogs", "ships"])))
  (corpus / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
      f"q{i}\td{i}\t1\n" for i in range(3)))
  names = tasks.register_collection_tasks("retrievecmd_tiny", str(corpus), "naive", vocab_size=100)
  ckpt = tmp_path / "run"
  ckpt.mkdir()   # the split is checked before the model or params are needed
  (ckpt / "model.gin").write_text(toy_tasks.tiny_t5_model_gin(100) + f"""models.get_model.model = %MODEL
MIXTURE_OR_TASK_NAME = "{names['retrieval']}"
TASK_FEATURE_LENGTHS = {{"inputs": 32, "targets": 16}}
""")
  assert cli.main(_argv(ckpt)) == 2
  err = capsys.readouterr().err
  assert "config key SPLIT: split 'test' of" in err and "is empty; non-empty: ['train']" in err, err
  assert not (ckpt / "retrieve_test_beam20").exists()


def test_cut_queries_are_counted(tmp_path):
  """Queries longer than TASK_FEATURE_LENGTHS['inputs'] are cut as training cut them, and metrics.json says how
  many (they were cut without a word)."""
  import tasks
  from genret_jax.identifiers.vocab import encode_batch
  ckpt = _checkpoint(tmp_path, "naive")
  out = tmp_path / "out"
  assert cli.main(_argv(ckpt, "--gin.BEAM_SIZE=2", "--gin.genret.retrieve_run.max_queries=6",
                        "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 16}", f"--gin.OUTPUT_DIR=\"{out}\"")) == 0
  name = "genret_retrievecmd_naive_naive_retrieval"
  queries = tasks.artefacts_for(name).query_splits()["test"][:6]
  vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
  want = [q.query_id for q, ids in zip(queries, encode_batch(vocab, [q.text for q in queries])) if len(ids) > 7]
  report = json.loads((out / "metrics.json").read_text())["report"]["inputs"]
  assert want and report == {"queries_truncated": len(want), "inputs_length": 8, "truncated_query_ids": want}


def test_resume_refuses_batches_of_other_queries(tmp_path, capsys, monkeypatch):
  """meta.json counts the queries without listing them: a restart whose split now holds other queries (the
  same number) kept the old rows and scored the new queries as having retrieved nothing."""
  import tasks
  ckpt = _checkpoint(tmp_path, "naive")
  argv = _argv(ckpt, "--gin.BEAM_SIZE=2", "--gin.INFER_BATCH_SIZE=8", "--gin.genret.retrieve_run.max_queries=4")
  assert cli.main(argv) == 0
  artefacts = tasks.artefacts_for("genret_retrievecmd_naive_naive_retrieval")
  splits = artefacts.query_splits()
  monkeypatch.setattr(type(artefacts), "query_splits", lambda self: {**splits, "test": splits["test"][1:]})
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "results.jsonl: batch 0 holds queries" in err and "the split's queries changed" in err, err


def test_ranking_workers_give_the_same_bytes_and_may_change_on_restart(tmp_path):
  """`RetrievalConfig.ranking_workers=2` scores the n-gram queries in two spawned processes reading the cached
  suffix array memory-mapped: the same results.jsonl and run file as in-process scoring, and a restart with
  another worker count resumes (it does not change results, so it is not part of the job's identity)."""
  ckpt = _checkpoint(tmp_path, "ngram")
  common = ["--gin.BEAM_SIZE=3", "--gin.INFER_BATCH_SIZE=8", "--gin.genret.retrieve_run.max_queries=16"]
  one, two = tmp_path / "one", tmp_path / "two"
  assert cli.main(_argv(ckpt, *common, f"--gin.OUTPUT_DIR=\"{one}\"")) == 0
  assert cli.main(_argv(ckpt, *common, f"--gin.OUTPUT_DIR=\"{two}\"", "--gin.RetrievalConfig.ranking_workers=2")) == 0
  for name in ("results.jsonl", "run.trec"):
    assert (one / name).read_bytes() == (two / name).read_bytes()
  assert cli.main(_argv(ckpt, *common, f"--gin.OUTPUT_DIR=\"{two}\"")) == 0   # resumed with 1 worker
  assert cli.main(_argv(ckpt, "--gin.RetrievalConfig.ranking_workers=0", "--gin.genret.retrieve_run.max_queries=2")
                  ) == 2
