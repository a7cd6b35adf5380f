"""`genret retrieve` through runs/infer.gin on an n-gram scheme (the embedded default corpus, a random tiny
T5): the suffix array split into device shards (`INDEX_SHARDS`, placed over a 2-way `model` mesh axis) gives
the same run file as one shard; a docid scheme refuses shards with a one-line error."""

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
