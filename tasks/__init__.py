"""seqio tasks for generative retrieval, importable by any t5x-style project (`import tasks`).

On import this registers, for every identifier scheme (or those in $GENRET_DEFAULT_SCHEMES, comma-separated):
  * the embedded default corpus (`genret_jax.corpora.default`): genret_default_<scheme>_*
  * Cranfield and SciFact from $GENRET_SHARED_DATA (default: ../shared/data next to the repository), when
    that directory exists: genret_cranfield_<scheme>_*, genret_scifact_<scheme>_*
Set GENRET_REGISTER_DEFAULT_TASKS=0 to skip them. Registration builds nothing; identifiers, vocabulary and
examples are built on first use and cached under $GENRET_CACHE (default ~/.cache/genret).
Naming and the gin entry points: see tasks/registration.py and docs/identifiers.md.
"""

from __future__ import annotations

import os

import gin

from genret_jax import identifiers
from tasks.artefacts import DEFAULT_CORPUS, CollectionArtefacts, cache_root
from tasks.registration import (DEFAULT_FRACTIONS, LazySentencePieceVocabulary, artefacts_for,
                                check_distinct_fractions, collection_task, fraction_suffix,
                                register_collection_tasks)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data_dir() -> str:
  return os.environ.get("GENRET_SHARED_DATA", os.path.join(os.path.dirname(_REPO_ROOT), "shared", "data"))


@gin.configurable(module="tasks")
def register_default_tasks(data_dir: str | None = None, schemes=None, seed: int = 0,
                           vocab_size: int = 2000) -> list[str]:
  """Registers the default corpus and, when present, Cranfield and SciFact; returns the mixture names."""
  data_dir = data_dir or shared_data_dir()
  if schemes is None:
    env = os.environ.get("GENRET_DEFAULT_SCHEMES", "")
    schemes = [s for s in env.split(",") if s] or sorted(identifiers.SCHEMES)
  corpora = [("default", DEFAULT_CORPUS)]
  for name in ("cranfield", "scifact"):
    path = os.path.join(data_dir, name)
    if os.path.isdir(path):
      corpora.append((name, path))
  names = []
  for name, path in corpora:
    for scheme in schemes:
      names.append(register_collection_tasks(name, path, scheme, seed=seed, vocab_size=vocab_size)["mixture"])
  return names


if os.environ.get("GENRET_REGISTER_DEFAULT_TASKS", "1") != "0":
  DEFAULT_MIXTURES = register_default_tasks()

__all__ = ["register_collection_tasks", "collection_task", "register_default_tasks", "artefacts_for",
           "CollectionArtefacts", "LazySentencePieceVocabulary", "DEFAULT_FRACTIONS", "fraction_suffix",
           "check_distinct_fractions", "cache_root", "shared_data_dir"]
