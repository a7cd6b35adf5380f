"""seqio task and mixture registration for a (collection, identifier scheme).

Names, for prefix P = `genret_<collection>_<scheme>` (or `task_prefix`):
  P_indexing           document text -> identifier (split: train)
  P_retrieval          query -> identifier (train / validation / test)
  P_retrieval_fXXX     same, train split reduced to the nested seeded fraction XXX/100 (e.g. _f040)
  P                    mixture of P_indexing and P_retrieval
  P_fXXX               mixture of P_indexing and P_retrieval_fXXX
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import gin
import seqio
import tensorflow as tf

from genret_jax import identifiers
from genret_jax.errors import InputError
from tasks.artefacts import CollectionArtefacts

FEATURE_KEYS = ("inputs", "targets", "query_id", "doc_id")
DEFAULT_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


class LazySentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary whose model file is built (or read from the cache) on first use, so that
  registering tasks costs nothing."""

  def __init__(self, artefacts: CollectionArtefacts, extra_ids: int = 0):
    super().__init__("", extra_ids=extra_ids)
    self._artefacts = artefacts

  def _model_context(self):
    if not self._sentencepiece_model_file:
      self._sentencepiece_model_file = self._artefacts.vocab_file()
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file

  def __eq__(self, other):
    return (isinstance(other, LazySentencePieceVocabulary) and self._artefacts == other._artefacts
            and self.extra_ids == other.extra_ids)


def fraction_suffix(fraction: float) -> str:
  """`_f020` for 0.2 (whole percents keep the short form); `_f0p125`, `_f0p001` for finer fractions, so no two
  fractions of a log-spaced sweep share a task name."""
  percent = fraction * 100
  if abs(percent - round(percent)) < 1e-9:
    return f"_f{int(round(percent)):03d}"
  return "_f" + f"{fraction:.6g}".replace(".", "p")


def check_distinct_fractions(fractions, key: str = "data_fractions") -> None:
  seen: dict[str, float] = {}
  for f in fractions:
    other = seen.setdefault(fraction_suffix(f), f)
    if other != f:
      raise InputError(f"data fractions {other} and {f} are too close to tell apart (both {fraction_suffix(f)})",
                       key=key)


def _examples_rate(task, *, artefacts: CollectionArtefacts, role: str, fraction: float = 1.0) -> float:
  """Examples-proportional mixing rate: every training example is drawn about once per epoch of the mixture,
  as from the reference's one shuffled training file, so a data fraction changes D, not how often each
  example is seen. Called by seqio when the mixture's dataset is built, so registration stays cheap."""
  del task
  retrieval, indexing = artefacts.num_train_examples(fraction)
  return float(indexing if role == "indexing" else retrieval)


def _to_dataset(examples: list[dict]) -> tf.data.Dataset:
  columns = {k: tf.constant([e[k] for e in examples], dtype=tf.string, shape=[len(examples)])
             for k in FEATURE_KEYS}
  return tf.data.Dataset.from_tensor_slices(columns)


def _retrieval_dataset(split: str, shuffle_files: bool, seed=None, *, artefacts: CollectionArtefacts,
                       fraction: float = 1.0) -> tf.data.Dataset:
  del shuffle_files, seed  # one in-memory "file"; the task shuffles examples
  groups = artefacts.retrieval_examples(split)
  if split == "train" and fraction < 1.0:
    groups = [groups[i] for i in artefacts.fraction_pairs(len(groups), fraction)]
  return _to_dataset([e for g in groups for e in g])


def _indexing_dataset(split: str, shuffle_files: bool, seed=None, *,
                      artefacts: CollectionArtefacts) -> tf.data.Dataset:
  del split, shuffle_files, seed
  return _to_dataset(artefacts.indexing_examples())


def _add_prefix(prefix: str):
  @seqio.map_over_dataset
  def fn(ex):
    out = {k: ex[k] for k in FEATURE_KEYS}
    if prefix:
      out["inputs"] = tf.strings.join([prefix, ex["inputs"]])
    return out
  return fn


def _add_task(name: str, source, vocabulary, inputs_prefix: str) -> None:
  if name in seqio.TaskRegistry.names():
    logging.info("re-registering seqio task %s", name)
    seqio.TaskRegistry.remove(name)
  features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
              "targets": seqio.Feature(vocabulary, add_eos=True)}
  seqio.TaskRegistry.add(
      name, source=source, output_features=features,
      preprocessors=[_add_prefix(inputs_prefix), seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim])


def _add_mixture(name: str, tasks: list[tuple[str, Any]]) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, tasks)


@gin.configurable(module="tasks")
def register_collection_tasks(collection_name: str, collection_path: str, scheme: str,
                              vocab_path: str | None = None, *, scheme_config: dict | None = None,
                              seed: int = 0, data_fractions=DEFAULT_FRACTIONS, vocab_size: int = 2000,
                              collection_format: str | None = None, task_prefix: str | None = None,
                              validation_fraction: float = 0.1, test_fraction: float = 0.1,
                              min_grade: int = 1, indexing_rate: float | None = None,
                              retrieval_rate: float | None = None,
                              query_prefix: str = "", document_prefix: str = "",
                              cache_dir: str | None = None) -> dict[str, str]:
  """Registers indexing/retrieval tasks and mixtures for a corpus + scheme; returns {role: name}.

  Cheap: nothing is read or built until a dataset or the vocabulary is first used.
  `collection_path` is a path `genret_jax.corpora.load` reads, or "default" for the embedded corpus.
  `vocab_path` extends an existing SentencePiece model (T5's, LLaMA's) with the scheme's tokens; without it
  a vocabulary of `vocab_size` is trained on the corpus (+ queries) once and cached.
  Mixtures draw each task in proportion to its number of training examples (one epoch of the mixture is one
  pass over both); `indexing_rate` and `retrieval_rate`, given together, are fixed weights instead.
  """
  # Bad options fail here, before anything is registered, not at first use.
  identifiers.scheme_class(scheme).make_config(**dict(scheme_config or {}))
  fractions = sorted(set(float(x) for x in data_fractions))
  for f in fractions:
    if not 0 < f <= 1:
      raise InputError(f"data fractions must be in (0, 1], got {f}", key="data_fractions")
  check_distinct_fractions(fractions)
  if (indexing_rate is None) != (retrieval_rate is None):
    raise InputError("give both mixing rates or neither (neither: in proportion to the tasks' training examples)",
                     key="indexing_rate" if indexing_rate is None else "retrieval_rate")
  artefacts = CollectionArtefacts(
      collection_name=collection_name, collection_path=str(collection_path), scheme=scheme,
      scheme_config_json=json.dumps(dict(scheme_config or {}), sort_keys=True), seed=int(seed),
      collection_format=collection_format, vocab_path=vocab_path, vocab_size=int(vocab_size),
      validation_fraction=validation_fraction, test_fraction=test_fraction, min_grade=min_grade,
      cache_dir=cache_dir, query_prefix=query_prefix)
  vocabulary = LazySentencePieceVocabulary(artefacts)
  prefix = task_prefix or f"genret_{collection_name}_{scheme}"
  names = {"indexing": f"{prefix}_indexing", "retrieval": f"{prefix}_retrieval", "mixture": prefix}
  _add_task(names["indexing"], seqio.FunctionDataSource(
      functools.partial(_indexing_dataset, artefacts=artefacts), splits=["train"]), vocabulary,
            document_prefix)
  splits = ["train", "validation", "test"]
  _add_task(names["retrieval"], seqio.FunctionDataSource(
      functools.partial(_retrieval_dataset, artefacts=artefacts), splits=splits), vocabulary, query_prefix)
  def rate(role: str, fraction: float = 1.0):
    given = indexing_rate if role == "indexing" else retrieval_rate
    if given is not None:
      return float(given)
    return functools.partial(_examples_rate, artefacts=artefacts, role=role, fraction=fraction)

  _add_mixture(prefix, [(names["indexing"], rate("indexing")), (names["retrieval"], rate("retrieval"))])
  for f in fractions:
    if f == 1.0:
      continue
    suffix = fraction_suffix(f)
    names[f"retrieval{suffix}"] = f"{prefix}_retrieval{suffix}"
    _add_task(names[f"retrieval{suffix}"], seqio.FunctionDataSource(
        functools.partial(_retrieval_dataset, artefacts=artefacts, fraction=f), splits=splits),
              vocabulary, query_prefix)
    names[f"mixture{suffix}"] = f"{prefix}{suffix}"
    _add_mixture(f"{prefix}{suffix}", [(names["indexing"], rate("indexing")),
                                       (names[f"retrieval{suffix}"], rate("retrieval", f))])
  _registered[prefix] = artefacts
  return names


_registered: dict[str, CollectionArtefacts] = {}


def artefacts_for(task_or_mixture_name: str) -> CollectionArtefacts:
  """The artefacts (identifier scheme, vocabulary, collection) behind a registered name."""
  for prefix in sorted(_registered, key=len, reverse=True):
    if task_or_mixture_name == prefix or task_or_mixture_name.startswith(prefix + "_"):
      return _registered[prefix]
  raise KeyError(f"{task_or_mixture_name!r} was not registered by tasks.register_collection_tasks")


@gin.configurable(module="tasks")
def collection_task(collection_name: str = gin.REQUIRED, collection_path: str = gin.REQUIRED,
                    scheme: str = "ngram", role: str = "mixture", fraction: float = 1.0, **kwargs) -> str:
  """Registers (like `register_collection_tasks`) and returns one name, for gin files:

    MIXTURE_OR_TASK_NAME = @tasks.collection_task()
    tasks.collection_task.collection_name = "mycorpus"
    tasks.collection_task.collection_path = "/data/mycorpus"
    tasks.collection_task.scheme = "semantic"
    tasks.collection_task.fraction = 0.4
  role: "mixture", "retrieval" or "indexing".
  """
  fractions = tuple(sorted(set(kwargs.pop("data_fractions", DEFAULT_FRACTIONS)) | {fraction}))
  names = register_collection_tasks(collection_name, collection_path, scheme, data_fractions=fractions,
                                    **kwargs)
  if role == "indexing":
    return names["indexing"]
  key = role if fraction >= 1.0 else f"{role}{fraction_suffix(fraction)}"
  if key not in names:
    raise InputError(f"unknown role {role!r}; choose mixture, retrieval or indexing", key="role")
  return names[key]
