"""`genret build-index`: build and save a decoding constraint — a suffix array over a tokenised corpus
(n-gram identifiers) or a trie over identifier token sequences (docid schemes) — and report its memory
per corpus token.

Input, either
  * `--task`: a registered seqio task or mixture; builds the constraint of its identifier scheme for a model
    vocabulary of `--vocab_size` into the task's artefact cache, where `genret retrieve` and sweeps load it
    (n-gram schemes: also `--index_shards` device shards). With `--gin_file=<run>/model.gin` the task and the
    vocabulary size default to its MIXTURE_OR_TASK_NAME and model. Built once, e.g. on a large CPU host
    before a pod job (`retrieval/scheme_index.py`);
  * `--tokens_file`: one document (suffix array) or identifier (trie) per line, whitespace-separated
    non-negative token ids (an empty line is an empty document); or
  * `--corpus` + `--spm_model`: a corpus path (any format `genret_jax.corpora.load` reads), tokenised
    as "title text" with a SentencePiece model.
The last two write `--output_dir`, for use through the Python API (`SuffixArrayIndex.load`,
`TrieConstraint.load`). Every option can also come from gin (`build_index.kind = 'trie'`, ...); flags win
over gin.

  genret build-index --gin_file=/runs/r0/model.gin --index_shards=4
  genret build-index --tokens_file=docs.txt --output_dir=idx --sep_id=0
  genret build-index --gin_file=index.gin --gin.build_index.output_dir="'idx'"
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import gin
import numpy as np

from genret_jax import atomic_files
from genret_jax.errors import InputError, check_int
from genret_jax.gin_utils import add_gin_arguments, parse_gin

KINDS = ("suffix_array", "trie")


def read_token_file(path: str, vocab_size: int | None = None) -> list[np.ndarray]:
  """One sequence per line; raises InputError naming file:line on a bad token (or one >= `vocab_size`)."""
  seqs = []
  try:
    f = open(path)
  except OSError as e:
    raise InputError(f"cannot read token file: {e.strerror}", path=path) from e
  with f:
    for lineno, line in enumerate(f, start=1):
      try:
        ids = np.array([int(t) for t in line.split()], dtype=np.int64)
      except ValueError as e:
        raise InputError(f"expected whitespace-separated integer token ids ({e})", path=path,
                         line=lineno) from e
      if ids.size and ids.min() < 0:
        raise InputError(f"negative token id {int(ids.min())}", path=path, line=lineno)
      if ids.size and vocab_size is not None and ids.max() >= vocab_size:
        raise InputError(f"token id {int(ids.max())} >= vocab_size {vocab_size}", path=path, line=lineno)
      seqs.append(ids)
  if not any(s.size for s in seqs):   # an empty index was written before
    raise InputError("no token ids in the file", path=path)
  return seqs


def tokenize_corpus(corpus: str, spm_model: str, vocab_size: int | None = None) -> list[np.ndarray]:
  """The corpus's "title text" as SentencePiece ids; with `vocab_size`, refuses a model with more pieces (its ids
  would index past the model's vocabulary, as `read_token_file` refuses such ids)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from genret_jax import corpora  # pylint: disable=g-import-not-at-top
  try:
    sp = spm.SentencePieceProcessor(model_file=spm_model)
  except (OSError, RuntimeError) as e:
    raise InputError(f"cannot load SentencePiece model: {e}", path=spm_model) from e
  if vocab_size is not None and sp.get_piece_size() > vocab_size:
    raise InputError(f"the SentencePiece model has {sp.get_piece_size()} pieces (token ids up to "
                     f"{sp.get_piece_size() - 1}) but --vocab_size is {vocab_size}: pass the model's vocabulary "
                     "size, at least the number of pieces", path=spm_model, key="build_index.vocab_size")
  collection = corpora.load(corpus)
  texts = [f"{d.title} {d.text}".strip() for d in collection.documents]
  return [np.asarray(ids, np.int64) for ids in sp.encode(texts)]


@gin.configurable("build_index")
def build_index_config(kind: str = "suffix_array", output_dir: str | None = None,
                       tokens_file: str | None = None, corpus: str | None = None,
                       spm_model: str | None = None, sep_id: int = 0, eos_id: int = 1,
                       vocab_size: int | None = None, dense_levels: int | None = None, task: str | None = None,
                       index_shards: int = 1) -> dict:
  """The gin-bound options (gin's wrapper would decorate errors raised inside, so it only collects)."""
  return dict(locals())


def build_task_index(task: str | None, vocab_size: int | None, index_shards: int = 1) -> dict:
  """`--task` mode: the task and the vocabulary size default to those of a parsed model.gin
  (MIXTURE_OR_TASK_NAME; `models.get_model.model`'s vocabulary)."""
  from genret_jax.gin_utils import config_value  # pylint: disable=g-import-not-at-top
  from genret_jax.models import model_api  # pylint: disable=g-import-not-at-top
  from genret_jax.retrieval import run as retrieval_run  # pylint: disable=g-import-not-at-top
  task = task or config_value("MIXTURE_OR_TASK_NAME")
  if not vocab_size and config_value("models.get_model.model") is not None:
    vocab_size = model_api.get_model().config.vocab_size
  if not isinstance(task, str) or not task:
    raise InputError("give --task (or a --gin_file with a MIXTURE_OR_TASK_NAME name), --tokens_file, or --corpus "
                     f"and --spm_model; task: {task!r}", key="build_index.task")
  if not isinstance(vocab_size, int) or vocab_size < 2:
    raise InputError("the model vocabulary size is required with --task (--vocab_size, or a model.gin as "
                     f"--gin_file); got {vocab_size!r}", key="build_index.vocab_size")
  return retrieval_run.build_task_index(task, vocab_size, index_shards)


def build_index(kind: str = "suffix_array", output_dir: str | None = None, tokens_file: str | None = None,
                corpus: str | None = None, spm_model: str | None = None, sep_id: int = 0,
                eos_id: int = 1, vocab_size: int | None = None, dense_levels: int | None = None) -> dict:
  """Builds and saves the index; returns the report (also written to `<output_dir>/report.json`)."""
  if kind not in KINDS:
    raise InputError(f"kind must be one of {KINDS}, got {kind!r}", key="build_index.kind")
  if not output_dir:
    raise InputError("an output directory is required", key="build_index.output_dir")
  if vocab_size is not None:
    check_int(vocab_size, "build_index.vocab_size", low=2)
  check_int(sep_id, "build_index.sep_id", low=0)
  check_int(eos_id, "build_index.eos_id", low=0)
  if kind == "suffix_array" and vocab_size is not None and sep_id > vocab_size:
    # sep_id == vocab_size is one id past the vocabulary, never generated (what `--task` indexes use); a larger
    # one (like a token id >= vocab_size, refused below) means the ids are not those of this vocabulary.
    raise InputError(f"--sep_id {sep_id} is past --vocab_size {vocab_size}: give a separator < vocab_size that "
                     f"never occurs in documents, or {vocab_size} (one past the vocabulary)",
                     key="build_index.sep_id")
  if kind == "trie" and vocab_size is not None and eos_id >= vocab_size:
    raise InputError(f"--eos_id {eos_id} >= --vocab_size {vocab_size}", key="build_index.eos_id")
  if tokens_file:
    seqs = read_token_file(tokens_file, vocab_size)
  elif corpus and spm_model:
    seqs = tokenize_corpus(corpus, spm_model, vocab_size)
  else:
    raise InputError("give tokens_file, or corpus and spm_model", key="build_index.tokens_file")
  empty = sum(1 for s in seqs if not s.size)   # a suffix array keeps them as empty documents
  skipped = 0
  if kind == "trie":   # an empty line is not an identifier
    skipped = empty
    seqs = [s for s in seqs if s.size]
  num_tokens = int(sum(len(s) for s in seqs))
  start = time.perf_counter()
  if kind == "suffix_array":
    from genret_jax.decoding.suffix_array import SuffixArrayIndex  # pylint: disable=g-import-not-at-top
    index = SuffixArrayIndex.build(seqs, sep_id=sep_id)
    seconds = time.perf_counter() - start
    index.save(output_dir)
    nbytes, indexed = index.nbytes, index.num_tokens
  else:
    from genret_jax.decoding.trie import TrieConstraint  # pylint: disable=g-import-not-at-top
    vocab = vocab_size or int(max((int(s.max()) for s in seqs if s.size), default=eos_id)) + 1
    vocab = max(vocab, eos_id + 1)
    index = TrieConstraint.build([s.tolist() for s in seqs], vocab_size=vocab, eos_id=eos_id,
                                 dense_levels=dense_levels)
    seconds = time.perf_counter() - start
    index.save(output_dir)
    nbytes, indexed = index.nbytes, num_tokens + len(seqs)
  report = {"kind": kind, "output_dir": output_dir, "num_sequences": len(seqs), "empty_lines": empty,
            "skipped_empty": skipped,
            "num_tokens": num_tokens, "indexed_tokens": indexed, "nbytes": int(nbytes),
            "bytes_per_token": nbytes / max(indexed, 1), "build_seconds": seconds,
            "tokens_per_second": indexed / seconds if seconds > 0 else None}
  atomic_files.write_json(f"{output_dir}/report.json", report, indent=2)
  return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_gin_arguments(parser)
  parser.add_argument("--kind", choices=KINDS, help="suffix_array (n-gram ids) or trie (docids).")
  parser.add_argument("--output_dir")
  parser.add_argument("--tokens_file", help="One sequence per line of whitespace-separated token ids.")
  parser.add_argument("--corpus", help="Corpus path (with --spm_model).")
  parser.add_argument("--spm_model", help="SentencePiece model to tokenise --corpus.")
  parser.add_argument("--sep_id", type=int, help="Document separator id (suffix array).")
  parser.add_argument("--eos_id", type=int, help="EOS id (trie identifiers end with it).")
  parser.add_argument("--vocab_size", type=int)
  parser.add_argument("--dense_levels", type=int)
  parser.add_argument("--task", help="Registered task or mixture: build the index `genret retrieve` loads.")
  parser.add_argument("--index_shards", type=int, help="With --task, n-gram schemes: device shards to save.")


def run(args: argparse.Namespace) -> int:
  from genret_jax.models import model_api  # noqa: F401  (registers the model configurables a model.gin binds)
  parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
  overrides = {k: getattr(args, k) for k in ("kind", "output_dir", "tokens_file", "corpus", "spm_model",
                                             "sep_id", "eos_id", "vocab_size", "dense_levels", "task",
                                             "index_shards")
               if getattr(args, k) is not None}
  options = {**build_index_config(), **overrides}
  task, index_shards = options.pop("task"), options.pop("index_shards")
  if task or (not options["tokens_file"] and not options["corpus"]):
    report = build_task_index(task, options["vocab_size"], index_shards)
  elif index_shards != 1:
    raise InputError("index shards are saved with --task only (the index `genret retrieve` loads)",
                     key="build_index.index_shards")
  else:
    report = build_index(**options)
  json.dump(report, sys.stdout, indent=2)
  print()
  return 0
