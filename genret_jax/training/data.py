"""Deterministic, resumable seqio input pipeline for the trainer.

The stream is a pure function of (task, feature lengths, seed, host shard): resuming skips exactly the batches
already consumed, so examples seen before a restart are not seen again and the run is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from genret_jax import filesystem
from genret_jax.errors import InputError


def feature_converter_for(family: str, pack: bool = False) -> seqio.FeatureConverter:
  if family in ("t5", "encoder_decoder"):
    return seqio.EncDecFeatureConverter(pack=pack)
  if family in ("llama", "decoder_only"):
    return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=True)
  raise InputError(f"unknown model family {family!r}", key="family")


def get_task(mixture_or_task_name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture, else an InputError naming the config key."""
  # On an unknown name seqio logs every registered mixture at INFO (~200 lines over the error): quieted.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(max(level, logging.WARNING))
  try:
    return seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError as e:
    raise InputError(f"no seqio task or mixture named {mixture_or_task_name!r}; is its module imported "
                     f"(`import tasks` in the gin file)?", key="MIXTURE_OR_TASK_NAME") from e
  finally:
    absl_logger.setLevel(level)


def check_model_vocabulary(mixture_or_task_name: str, model_vocab_size: int) -> None:
  """A model vocabulary smaller than the task's: token ids past the embedding table made the loss NaN, far from
  the cause."""
  task = get_task(mixture_or_task_name)
  sizes = {f.vocabulary.vocab_size for f in task.output_features.values()}
  if max(sizes) > model_vocab_size:
    raise InputError(f"the model's vocabulary ({model_vocab_size}) is smaller than the task's ({max(sizes)}, "
                     f"{mixture_or_task_name}): raise the model's vocab_size (the VOCAB_SIZE macro of the ladder "
                     "configs)", key="vocab_size")


def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str,
                batch_size: int, feature_converter: seqio.FeatureConverter, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, use_cached: bool = False, skip_batches: int = 0,
                shard_index: int = 0, num_shards: int = 1, drop_remainder: bool = True) -> tf.data.Dataset:
  """Batches of `batch_size / num_shards` rows: this process's shard of each global batch (the trainer takes
  `shard_index` and `num_shards` from the mesh, `partitioning.process_batch_slice`). `drop_remainder=False` keeps
  a last, shorter batch (evaluation pads it)."""
  get_task(mixture_or_task_name)
  if batch_size % num_shards:
    raise InputError(f"BATCH_SIZE {batch_size} is not divisible by the {num_shards} data shards (hosts)",
                     key="BATCH_SIZE")
  ds = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths), feature_converter=feature_converter,
      dataset_split=split, use_cached=use_cached, shuffle=shuffle, num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards), seed=seed,
      batch_size=batch_size // num_shards if drop_remainder else None)
  if not drop_remainder:
    ds = ds.batch(batch_size // num_shards, drop_remainder=False)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds


def truncation_counts(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str = "train",
                      max_examples: int = 2000, use_cached: bool = False) -> dict[str, dict[str, dict[str, int]]]:
  """{task: {feature: {"examples", "over", "longest"}}} over the first `max_examples` examples of each task of
  the mixture: how many are longer (EOS included) than their feature length. seqio trims those rows to fit
  (keeping the EOS) and says nothing; for docid targets a trimmed row is another identifier. A sample, so that
  a 21M-passage task costs the same second as a small one."""
  provider = get_task(mixture_or_task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  out = {}
  for task in tasks:
    if split not in task.splits:
      continue
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1, use_cached=use_cached,
                          trim_output_features=False)
    features = [k for k in task_feature_lengths if k in ds.element_spec]
    ds = ds.take(max_examples).map(lambda ex: {k: tf.size(ex[k]) for k in features})
    sizes = {k: [] for k in features}
    for ex in ds.as_numpy_iterator():
      for k in features:
        sizes[k].append(int(ex[k]))
    out[task.name] = {k: {"examples": len(v), "over": sum(x > task_feature_lengths[k] for x in v),
                          "longest": max(v, default=0)} for k, v in sizes.items()}
  return out


class ResumableBatches:
  """Numpy batches of a tf.data pipeline whose position can be saved and restored (t5x's `save_dataset`).

  Resuming by `skip_batches` re-runs the pipeline over every consumed batch: ~0.2 ms per batch of 32 on Cranfield
  (session 20, ad hoc), so minutes per host for a long pod run. The iterator's own checkpoint (tf.data saves its
  shuffle and prefetch buffers and the mixture's sampler state: ~2 MB at batch 32) restores it in a fraction of a
  second. A pipeline tf.data cannot checkpoint (a `py_function` in a user's preprocessor) is reported once and
  resumed by skipping as before.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._iterator = iter(ds)
    self.checkpointable = True

  def __iter__(self) -> "ResumableBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in next(self._iterator).items()}

  def save(self, directory: str) -> bool:
    """Writes the position to `directory` (a directory renamed into place, so a killed save leaves none)."""
    if not self.checkpointable:
      return False
    parent = os.path.dirname(filesystem.abspath(directory))
    filesystem.makedirs(parent)
    # Locally a directory renamed into place: a killed save leaves none. An object store renames object by object
    # (and ram:// not at all), so there the checkpoint is written in place: TF writes its index after the data,
    # and `restore` wants the index and checks what it reads, falling back to the skip.
    remote = filesystem.is_remote(directory)
    tmp = directory if remote else os.path.join(parent, f".tmp-{os.path.basename(directory)}-{uuid.uuid4().hex}")
    if remote:
      filesystem.rmtree(directory, ignore_errors=True)
    try:
      tf.train.Checkpoint(iterator=self._iterator).write(os.path.join(tmp, "iterator"))
    except (tf.errors.OpError, ValueError) as e:
      filesystem.rmtree(tmp, ignore_errors=True)
      self.checkpointable = False
      logging.warning("the input pipeline's position cannot be checkpointed (%s: %s); a restart will skip the "
                      "consumed batches instead", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      return False
    if not remote:
      filesystem.rmtree(directory, ignore_errors=True)
      os.replace(tmp, directory)
    return True

  def restore(self, directory: str) -> bool:
    """Restores the position saved in `directory`; False (iterator untouched) when there is none."""
    if not filesystem.exists(os.path.join(directory, "iterator.index")):
      return False
    try:
      tf.train.Checkpoint(iterator=self._iterator).read(os.path.join(directory, "iterator")).assert_consumed()
    except (tf.errors.OpError, ValueError, AssertionError) as e:
      logging.warning("%s: unreadable input-pipeline position (%s); skipping the consumed batches instead",
                      directory, type(e).__name__)
      return False
    return True


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  for batch in ds.as_numpy_iterator():
    yield {k: np.asarray(v) for k, v in batch.items()}
