"""A tiny seqio task for trainer tests, independent of the corpus/identifier stages: reverse short word lists,
tokenised with the small SentencePiece model in ../shared/data/tokenizers."""

import os
import pathlib

import seqio
import tensorflow as tf

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DATA = pathlib.Path(os.environ.get("GENRET_SHARED_DATA", _ROOT.parent / "shared" / "data"))
SPM = str(_DATA / "tokenizers" / "sentencepiece_botchan" / "botchan_en_unigram_1000.model")
VOCAB = seqio.SentencePieceVocabulary(SPM)
WORDS = ("the cat sat on a mat while old men read long books about red ships and small birds near the sea "
         "under a quiet sky").split()
TASK = "genret_test_reverse"


def _examples(split: str, n: int):
  rows = []
  offset = 0 if split == "train" else 1000
  for i in range(n):
    k = 3 + (i + offset) % 4
    words = [WORDS[(i * 7 + offset + j * 3) % len(WORDS)] for j in range(k)]
    rows.append((" ".join(words), " ".join(reversed(words))))
  return rows


def _source(split: str, shuffle_files: bool, seed=None):
  del shuffle_files, seed
  # 31 validation rows: not a multiple of any batch, and two hosts get unequal shards (evaluation pads both).
  rows = _examples(split, 256 if split == "train" else 31)
  return tf.data.Dataset.from_tensor_slices({"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows]})


if TASK not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      TASK,
      source=seqio.FunctionDataSource(_source, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)})


def tiny_t5_model_gin(vocab_size: int, decoder_layers: int = 1) -> str:
  """Gin for the tests' tiny T5 (d_model 32, 2 heads, one encoder layer), bound to the macro MODEL."""
  return f"""import genret_jax.models.model_api
MODEL = @models.EncoderDecoderModel()
models.EncoderDecoderModel.config = @models.T5Config()
models.T5Config.vocab_size = {vocab_size}
models.T5Config.d_model = 32
models.T5Config.num_heads = 2
models.T5Config.head_dim = 16
models.T5Config.d_ff = 64
models.T5Config.num_encoder_layers = 1
models.T5Config.num_decoder_layers = {decoder_layers}
models.T5Config.dtype = "float32"
"""


def train_gin(steps: int, mesh_data: int) -> str:
  """A `genret train` config on this task with the tiny one-decoder-layer T5 (subprocess tests: kill-restart,
  multi-host)."""
  return "import toy_tasks\nimport genret_jax.training.trainer\n" + tiny_t5_model_gin(1024) + f"""train.model = %MODEL
train.mixture_or_task_name = "genret_test_reverse"
train.task_feature_lengths = {{"inputs": 16, "targets": 16}}
train.train_steps = {steps}
train.batch_size = 8
train.checkpoint_every = 10
train.progress = False
train.mesh_config = @MeshConfig()
MeshConfig.data = {mesh_data}
"""


def collection_model_gin(collection: str, scheme: str, vocab_size: int) -> str:
  """model.gin of the tests' tiny T5 on the default corpus's `scheme` task, registering that task itself (so
  `genret` child processes need no import of the test's)."""
  return "import tasks\n" + tiny_t5_model_gin(vocab_size) + f"""models.get_model.model = %MODEL
MIXTURE_OR_TASK_NAME = @tasks.collection_task()
tasks.collection_task.collection_name = "{collection}"
tasks.collection_task.collection_path = "default"
tasks.collection_task.scheme = "{scheme}"
tasks.collection_task.role = "retrieval"
tasks.collection_task.vocab_size = 300
TASK_FEATURE_LENGTHS = {{"inputs": 32, "targets": 16}}
"""


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(argvs, cwds, envs, timeout: float) -> tuple[list[str], list[int]]:
  """Runs argvs[i] as process i of len(argvs) (jax.distributed on a free localhost port) in cwds[i] with envs[i];
  (outputs, exit codes). A process still running at the timeout (a hang) is killed, with the others."""
  import subprocess
  port = free_port()
  n = len(argvs)
  procs = [subprocess.Popen([*argv, f"--coordinator_address=localhost:{port}", f"--process_count={n}",
                             f"--process_index={i}"], cwd=cwds[i], env=envs[i], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i, argv in enumerate(argvs)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return outs, [p.returncode for p in procs]
