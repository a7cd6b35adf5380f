"""SentencePiece vocabularies with T5 conventions (pad 0, eos 1, unk 2, no bos) and identifier tokens.

Two ways to get one:
  * `train_sentencepiece(...)`: train on the corpus text (+ queries), the scheme's added tokens given as
    user_defined_symbols so each is one piece. Deterministic: one thread, fixed seed, sentences in
    collection order -> identical .model bytes.
  * `add_tokens(model_bytes, tokens)`: append tokens as USER_DEFINED pieces to an existing model (T5's,
    LLaMA's, or a base model trained once per corpus) by rebuilding the model proto.
`seqio_vocabulary(path)` wraps a model file as `seqio.SentencePieceVocabulary`; `encode_batch` tokenises many
texts with one (batched).

CLI: `genret build-vocab --corpus PATH --scheme NAME --output DIR [--vocab_size N] [--base_model M]`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from genret_jax import atomic_files
from genret_jax.corpora.types import Collection
from genret_jax.errors import InputError
from genret_jax.identifiers.base import check_seed, document_text

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_CHUNK_WORDS = 200  # SentencePiece skips "sentences" over max_sentence_length bytes: feed chunks instead


def corpus_sentences(collection: Collection, include_queries: bool = True) -> Iterable[str]:
  """Training text in collection order: documents (in word chunks), then queries."""
  for d in collection.documents:
    words = document_text(d).split()
    for i in range(0, len(words), _CHUNK_WORDS):
      yield " ".join(words[i:i + _CHUNK_WORDS])
  if include_queries:
    for q in collection.queries:
      if q.text.strip():
        yield " ".join(q.text.split())


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, *, added_tokens: Sequence[str] = (),
                        seed: int = 0, model_type: str = "unigram", character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000) -> bytes:
  """Trains a model and returns its serialized bytes.

  `vocab_size` counts the learned pieces plus pad/eos/unk; the added tokens come on top, so every scheme
  of one corpus gets the same text segmentation.
  """
  if vocab_size < 8:
    raise InputError("vocab_size must be at least 8", key="vocab_size")
  sentences = [s for s in sentences if s]
  if not sentences:
    raise InputError("no text to train a vocabulary on", key="corpus")
  spm.set_random_generator_seed(int(seed))
  model = io.BytesIO()
  added = _dedupe(added_tokens)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size + len(added), model_type=model_type,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      user_defined_symbols=added if added else "",
      character_coverage=character_coverage, hard_vocab_limit=False,
      input_sentence_size=max_sentences, shuffle_input_sentence=True,
      num_threads=1, minloglevel=2)
  got = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
  if got < vocab_size + len(added):   # hard_vocab_limit=False stops short on a small corpus: say so
    logging.warning("vocab_size %d: the corpus supports fewer pieces; trained %d (%d added tokens included)",
                    vocab_size, got, len(added))
  return model.getvalue()


def _dedupe(tokens: Sequence[str]) -> list[str]:
  seen, out = set(), []
  for t in tokens:
    if not t or any(c.isspace() for c in t):
      raise InputError(f"added token {t!r} is empty or contains whitespace", key="added_tokens")
    if t not in seen:
      seen.add(t)
      out.append(t)
  return out


def add_tokens(model_bytes: bytes, tokens: Sequence[str]) -> bytes:
  """Appends `tokens` (those not already pieces) as USER_DEFINED pieces; existing ids are unchanged."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  existing = {p.piece for p in proto.pieces}
  for t in _dedupe(tokens):
    if t not in existing:
      proto.pieces.add(piece=t, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return proto.SerializeToString()


def read_model(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
    spm.SentencePieceProcessor(model_proto=data)
  except (OSError, RuntimeError) as e:
    raise InputError(f"not a readable SentencePiece model: {e}", path=path) from e
  return data


def write_model(model_bytes: bytes, path: str) -> str:
  atomic_files.write_bytes(path, model_bytes)
  return path


def check_single_pieces(model_bytes: bytes, tokens: Sequence[str]) -> list[str]:
  """Tokens that do NOT encode to one piece (after the dummy-prefix '▁'); empty when all is well."""
  sp = spm.SentencePieceProcessor(model_proto=model_bytes)
  bad = []
  for t in tokens:
    pieces = [p for p in sp.encode(t, out_type=str) if p != "▁"]
    if pieces != [t]:
      bad.append(t)
  return bad


def seqio_vocabulary(path: str, extra_ids: int = 0):
  import seqio  # imported lazily: seqio pulls in TensorFlow
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def encode_batch(vocabulary, texts: Sequence[str], chunk: int = 8192) -> list[list[int]]:
  """`vocabulary.encode(t)` for every text. A seqio SentencePiece vocabulary encodes `chunk` texts per call to
  its processor, which spreads them over the host's threads instead of one Python call per text (the same
  processor, so the same ids: tested): 1.7x on this 2-core machine for SciFact's 5,183 document strings (ad hoc,
  session 14), and it scales with the cores of the host that tokenises a 21M-passage corpus."""
  tokenizer = getattr(vocabulary, "tokenizer", None)
  if not isinstance(tokenizer, spm.SentencePieceProcessor):
    return [list(vocabulary.encode(t)) for t in texts]
  out: list[list[int]] = []
  for start in range(0, len(texts), chunk):
    out.extend(tokenizer.encode(list(texts[start:start + chunk]), out_type=int))
  return out


def build_vocab_for_scheme(collection: Collection, scheme, output_path: str, *, vocab_size: int = 2000,
                           seed: int = 0, base_model: str | None = None,
                           include_queries: bool = True) -> str:
  """Trains (or extends `base_model`) a vocabulary holding `scheme.added_tokens()`; writes `output_path`."""
  tokens = scheme.added_tokens()
  if base_model:
    model = add_tokens(read_model(base_model), tokens)
  else:
    model = train_sentencepiece(corpus_sentences(collection, include_queries), vocab_size,
                                added_tokens=tokens, seed=seed)
  return write_model(model, output_path)


# ---- CLI: genret build-vocab --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--corpus", required=True, help="Collection path (BEIR dir, TSV, JSONL) or 'default'.")
  parser.add_argument("--format", default=None, help="Reader format (default: detect).")
  parser.add_argument("--scheme", default=None,
                      help="Identifier scheme whose tokens to add (built with --seed and --scheme_config), "
                           "or a saved scheme directory.")
  parser.add_argument("--scheme_config", default="{}", help="JSON options for the scheme.")
  parser.add_argument("--output", required=True, help="Output .model path.")
  parser.add_argument("--vocab_size", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--base_model", default=None,
                      help="Existing SentencePiece model to extend instead of training one.")
  parser.add_argument("--no_queries", action="store_true", help="Train on document text only.")


def run(args: argparse.Namespace) -> int:
  from genret_jax import identifiers
  from genret_jax.identifiers.build_ids import load_collection, parse_scheme_config
  check_seed(args.seed, "--seed")
  cfg = parse_scheme_config(args.scheme_config)
  collection = load_collection(args)
  if args.scheme and os.path.isdir(args.scheme):
    scheme = identifiers.load(args.scheme, collection)
  elif args.scheme:
    scheme = identifiers.build(args.scheme, collection, seed=args.seed, **cfg)
  else:
    scheme = None
  tokens = scheme.added_tokens() if scheme else []
  if args.base_model:
    model = add_tokens(read_model(args.base_model), tokens)
  else:
    model = train_sentencepiece(corpus_sentences(collection, not args.no_queries), args.vocab_size,
                                added_tokens=tokens, seed=args.seed)
  write_model(model, args.output)
  sp = spm.SentencePieceProcessor(model_proto=model)
  print(json.dumps({"output": args.output, "pieces": sp.get_piece_size(), "requested_vocab_size": args.vocab_size,
                    "added_tokens": len(tokens),
                    "pad_id": sp.pad_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(),
                    "bos_id": sp.bos_id()}, indent=1))
  return 0
