"""Training a CPU-ladder model on the Cranfield retrieval + indexing mixture lowers the loss, and the trained
model's retrieval-task loss (validation queries -> query-biased spans) beats the untrained model's (its own
initialisation, `trainer.initial_params`)."""

import jax
import numpy as np
import optax
import pytest

import tasks
from genret_jax.models import model_api
from genret_jax.models.llama import LlamaConfig
from genret_jax.models.t5 import T5Config
from genret_jax.training import data as data_lib
from genret_jax.training import trainer

LENGTHS = {"inputs": 48, "targets": 16}


@pytest.fixture(scope="module")
def cranfield_names(cranfield_dir, tmp_path_factory):
  return tasks.register_collection_tasks("cranfield_test", str(cranfield_dir), "ngram", vocab_size=1000,
                                         cache_dir=str(tmp_path_factory.mktemp("genret_cache")))


def _vocab_size(names):
  vocab = tasks.artefacts_for(names["mixture"])
  import seqio
  return int(np.ceil(seqio.SentencePieceVocabulary(vocab.vocab_file()).vocab_size / 128) * 128)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_training_beats_untrained_on_retrieval_loss(cranfield_names, tmp_path, family):
  v = _vocab_size(cranfield_names)
  if family == "t5":   # cpu_ladder r0 dimensions
    model = model_api.EncoderDecoderModel(T5Config(vocab_size=v, d_model=48, num_heads=4, head_dim=12, d_ff=128,
                                                   num_encoder_layers=2, num_decoder_layers=2, dtype="float32",
                                                   tie_word_embeddings=True))
  else:
    model = model_api.DecoderOnlyModel(LlamaConfig(vocab_size=v, d_model=48, num_layers=2, num_heads=4,
                                                   num_kv_heads=2, d_ff=128, dtype="float32",
                                                   tie_word_embeddings=True))
  res = trainer.train(model=model, mixture_or_task_name=cranfield_names["mixture"], task_feature_lengths=LENGTHS,
                      train_steps=80, model_dir=str(tmp_path / "run"), batch_size=32, seed=0,
                      optimizer=optax.adamw(6e-3), mesh_config=trainer.MeshConfig(data=1), progress=False,
                      write_config=False, checkpoint_every=1000)
  assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10]) - 1.0
  converter = data_lib.feature_converter_for(model.family)
  eval_fn = jax.jit(trainer.make_eval_step(model))
  batch_shapes = {"encoder_input_tokens": (1, LENGTHS["inputs"]), "decoder_input_tokens": (1, LENGTHS["targets"])}
  if family == "llama":
    batch_shapes = {"decoder_input_tokens": (1, LENGTHS["inputs"] + LENGTHS["targets"])}
  # Exactly the run's starting point (same seed and mesh, the trainer's jitted init: a compilation-cache hit).
  untrained = trainer.initial_params(model, 0, trainer.MeshConfig(data=1).build(), batch_shapes)

  def retrieval_loss(params):
    return trainer.evaluate(eval_fn, params, None, cranfield_names["retrieval"], LENGTHS, "validation", 32,
                            converter, seed=0, max_batches=4, use_cached=False)

  trained_loss, untrained_loss = retrieval_loss(res.params), retrieval_loss(untrained)
  print(f"{family}: retrieval loss trained {trained_loss:.3f} untrained {untrained_loss:.3f}")
  assert trained_loss < untrained_loss - 1.0, (trained_loss, untrained_loss)
