"""Built-on-demand, disk-cached artefacts for one (collection, scheme): identifiers, vocabulary, examples.

Nothing is built at task registration; the first use (a dataset, the vocabulary size) builds what it needs
and caches it under $GENRET_CACHE (default ~/.cache/genret), keyed by the collection fingerprint and every
option, so later processes (and `import tasks`) pay only a file read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np

from genret_jax import atomic_files, corpora, identifiers
from genret_jax.corpora import default as default_corpus
from genret_jax.corpora.types import Collection, Query
from genret_jax.errors import InputError
from genret_jax.identifiers import vocab as vocab_lib

DEFAULT_CORPUS = "default"  # collection_path naming the embedded default corpus
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}
_lock = threading.RLock()
_collections: dict[tuple, Collection] = {}
_memo: dict[tuple, Any] = {}


def cache_root(cache_dir: str | None = None) -> str:
  return os.path.abspath(os.path.expanduser(
      cache_dir or os.environ.get("GENRET_CACHE") or os.path.join("~", ".cache", "genret")))


def load_collection(path: str, fmt: str | None = None) -> Collection:
  key = (os.path.abspath(path) if path != DEFAULT_CORPUS else path, fmt)
  with _lock:
    if key not in _collections:
      _collections[key] = (default_corpus.load_default() if path == DEFAULT_CORPUS
                           else corpora.load(path, format=fmt))
    return _collections[key]


@dataclasses.dataclass(frozen=True)
class CollectionArtefacts:
  """Everything that determines the artefacts of one registration (hashable, picklable)."""

  collection_name: str
  collection_path: str
  scheme: str
  scheme_config_json: str = "{}"     # canonical JSON of the scheme options
  seed: int = 0
  collection_format: str | None = None
  vocab_path: str | None = None      # an existing SentencePiece model to extend instead of training one
  vocab_size: int = 2000
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  min_grade: int = 1
  cache_dir: str | None = None
  # The retrieval task's input prefix: not an artefact (the examples hold the bare query), but evaluations of
  # models trained on the task (sweeps) must prepend it as training did.
  query_prefix: str = ""

  @property
  def scheme_config(self) -> dict:
    return json.loads(self.scheme_config_json)

  def collection(self) -> Collection:
    return load_collection(self.collection_path, self.collection_format)

  def _memoized(self, what: str, fn):
    with _lock:
      if (self, what) not in _memo:
        _memo[(self, what)] = fn()
      return _memo[(self, what)]

  def fingerprint(self) -> str:
    return self._memoized("fingerprint", lambda: identifiers.collection_fingerprint(self.collection()))

  def queries_fingerprint(self) -> str:
    """sha256 of the queries (id, text, split, answers) and judgments: the retrieval examples, the query splits
    and the vocabulary (trained on queries too) depend on them, so an edited query or qrel gets a new cache entry."""
    def make():
      c = self.collection()
      h = hashlib.sha256(json.dumps([dataclasses.asdict(q) for q in c.queries], ensure_ascii=False).encode())
      h.update(json.dumps(c.qrels, sort_keys=True, ensure_ascii=False).encode())
      return h.hexdigest()
    return self._memoized("queries_fingerprint", make)

  def directory(self) -> str:
    def make():
      fields = dataclasses.asdict(self)
      fields.pop("cache_dir")
      fields.pop("query_prefix")   # applied by the task's preprocessor; the cached artefacts do not hold it
      fields.pop("collection_path")  # the fingerprint identifies the corpus, wherever it lives
      fields["fingerprint"] = self.fingerprint()
      fields["queries_fingerprint"] = self.queries_fingerprint()
      if self.vocab_path:
        fields["vocab_md5"] = hashlib.md5(vocab_lib.read_model(self.vocab_path)).hexdigest()
      key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
      d = os.path.join(cache_root(self.cache_dir), f"{self.collection_name}_{self.scheme}_{key}")
      os.makedirs(d, exist_ok=True)
      return d
    return self._memoized("directory", make)

  # ---- identifiers and vocabulary ------------------------------------------------------------------

  def retrieval_index_dir(self, vocab_size: int) -> str:
    """Where the retrieval constraint for a model vocabulary of `vocab_size` is cached (written by `genret retrieve`,
    sweeps and `genret build-index --task`; `genret_jax.retrieval.scheme_index`)."""
    return os.path.join(self.directory(), f"retrieval_index_v{int(vocab_size)}")

  def identifier_scheme(self) -> identifiers.IdentifierScheme:
    def make():
      d = os.path.join(self.directory(), "identifiers")
      if os.path.exists(os.path.join(d, identifiers.base.SCHEME_FILE)):
        return identifiers.load(d, self.collection())
      scheme = identifiers.build(self.scheme, self.collection(), seed=self.seed, **self.scheme_config)
      scheme.save(d)
      return scheme
    return self._memoized("scheme", make)

  def base_vocab_file(self) -> str:
    """One trained model per (corpus, vocab_size, seed), shared by every scheme of the corpus."""
    key = hashlib.sha256(f"{self.fingerprint()}|{self.vocab_size}|{self.seed}".encode()).hexdigest()[:16]
    path = os.path.join(cache_root(self.cache_dir), "vocab", f"{self.collection_name}_{key}.model")
    if not os.path.exists(path):
      model = vocab_lib.train_sentencepiece(vocab_lib.corpus_sentences(self.collection()), self.vocab_size,
                                            seed=self.seed)
      vocab_lib.write_model(model, path)
    return path

  def vocab_file(self) -> str:
    def make():
      path = os.path.join(self.directory(), "vocab.model")
      if not os.path.exists(path):
        base = self.vocab_path or self.base_vocab_file()
        model = vocab_lib.add_tokens(vocab_lib.read_model(base), self.identifier_scheme().added_tokens())
        vocab_lib.write_model(model, path)
      return path
    return self._memoized("vocab", make)

  # ---- splits and examples -----------------------------------------------------------------------

  def query_splits(self) -> dict[str, list[Query]]:
    """Judged queries per split (train/validation/test): the corpus's own splits, a validation set carved
    from train when there is none, or a seeded three-way split when the corpus has a single split."""
    def make():
      c = self.collection()
      grouped: dict[str, list[Query]] = {}
      for q in c.queries:
        if c.positives(q.query_id, self.min_grade):
          grouped.setdefault(_SPLIT_ALIASES.get(q.split, q.split), []).append(q)
      if not grouped:
        raise InputError(f"collection {c.name!r} has no judged queries (grade >= {self.min_grade})",
                         path=c.source or None)
      rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 7])
      if len(grouped) == 1:
        (only,) = grouped.values()
        order = rng.permutation(len(only))
        n_val = int(round(len(only) * self.validation_fraction))
        n_test = int(round(len(only) * self.test_fraction))
        pick = lambda idx: [only[i] for i in sorted(idx)]
        return {"validation": pick(order[:n_val]), "test": pick(order[n_val:n_val + n_test]),
                "train": pick(order[n_val + n_test:])}
      if "train" in grouped and "validation" not in grouped:
        train = grouped["train"]
        order = rng.permutation(len(train))
        n_val = int(round(len(train) * self.validation_fraction))
        grouped["validation"] = [train[i] for i in sorted(order[:n_val])]
        grouped["train"] = [train[i] for i in sorted(order[n_val:])]
      return grouped
    return self._memoized("splits", make)

  def retrieval_pairs(self, split: str) -> list[tuple[Query, int]]:
    c = self.collection()
    return [(q, c.doc_index(d)) for q in self.query_splits().get(split, [])
            for d in c.positives(q.query_id, self.min_grade)]

  def retrieval_examples(self, split: str) -> list[list[dict]]:
    """Per (query, positive doc) pair, its examples (a pair holds one docid or several spans)."""
    def make():
      path = os.path.join(self.directory(), f"retrieval_{split}.json")
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          return json.load(f)
      scheme = self.identifier_scheme()
      pairs = self.retrieval_pairs(split)
      targets = scheme.retrieval_targets_many([(q.text, idx) for q, idx in pairs], self.seed)
      out = [[{"inputs": q.text, "targets": t, "query_id": q.query_id, "doc_id": scheme.doc_ids[idx]}
              for t in pair_targets] for (q, idx), pair_targets in zip(pairs, targets)]
      atomic_files.write_json(path, out, ensure_ascii=False)
      return out
    return self._memoized(f"retrieval/{split}", make)

  def fraction_pairs(self, n_pairs: int, fraction: float) -> list[int]:
    """Indices of the pairs kept at `fraction`: prefixes of one seeded permutation, so 0.2 ⊂ 0.4 ⊂ ... ⊂ 1."""
    if not 0 < fraction <= 1:
      raise InputError(f"data fraction must be in (0, 1], got {fraction}", key="data_fractions")
    order = np.random.default_rng([self.seed & 0xFFFFFFFF, 11]).permutation(n_pairs)
    return sorted(order[:int(round(n_pairs * fraction))].tolist())

  def num_train_examples(self, fraction: float = 1.0) -> tuple[int, int]:
    """(retrieval training examples at `fraction`, indexing examples): what an epoch is counted in."""
    groups = self.retrieval_examples("train")
    if fraction < 1.0:
      groups = [groups[i] for i in self.fraction_pairs(len(groups), fraction)]
    return sum(len(g) for g in groups), len(self.indexing_examples())

  def indexing_examples(self) -> list[dict]:
    def make():
      path = os.path.join(self.directory(), "indexing.json")
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          return json.load(f)
      scheme = self.identifier_scheme()
      out, skipped = [], 0
      for i in range(scheme.num_docs):
        pairs = scheme.indexing_examples(i)
        skipped += not pairs
        out += [{"inputs": s, "targets": t, "query_id": "", "doc_id": scheme.doc_ids[i]} for s, t in pairs]
      atomic_files.write_json(path, out, ensure_ascii=False)
      atomic_files.write_json(os.path.join(self.directory(), "indexing_report.json"),
                              {"documents": scheme.num_docs, "documents_without_examples": skipped,
                               "examples": len(out)})
      return out
    return self._memoized("indexing", make)
