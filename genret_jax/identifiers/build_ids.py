"""CLI `genret build-ids`: build an identifier scheme for a corpus and save it (with the corpus fingerprint).

  genret build-ids --corpus ../shared/data/cranfield --scheme semantic \
      --scheme_config '{"branching": 10, "leaf_size": 100}' --seed 0 --output runs/ids/cranfield_semantic
"""

from __future__ import annotations

import argparse
import json

from genret_jax.errors import InputError
from genret_jax.identifiers.base import check_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--corpus", required=True, help="Collection path (BEIR dir, TSV, JSONL) or 'default'.")
  parser.add_argument("--format", default=None, help="Reader format (default: detect).")
  parser.add_argument("--scheme", required=True,
                      help="atomic | naive | semantic | codebook | title | ngram")
  parser.add_argument("--scheme_config", default="{}", help="JSON object of scheme options.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", required=True, help="Directory to save the scheme in.")


def parse_scheme_config(text: str) -> dict:
  """The --scheme_config flag's JSON object (`build-ids`, `build-vocab`)."""
  try:
    cfg = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"--scheme_config is not JSON: {e.msg}", key="scheme_config") from e
  if not isinstance(cfg, dict):
    raise InputError("--scheme_config must be a JSON object", key="scheme_config")
  return cfg


def load_collection(args: argparse.Namespace):
  """The --corpus flag's collection: `default` (the embedded corpus) or a path read as --format."""
  from genret_jax import corpora
  from genret_jax.corpora import default as default_corpus
  return default_corpus.load_default() if args.corpus == "default" else corpora.load(args.corpus, format=args.format)


def run(args: argparse.Namespace) -> int:
  from genret_jax import identifiers
  check_seed(args.seed, "--seed")
  cfg = parse_scheme_config(args.scheme_config)
  identifiers.scheme_class(args.scheme).make_config(**cfg)   # before the corpus is read
  collection = load_collection(args)
  scheme = identifiers.build(args.scheme, collection, seed=args.seed, **cfg)
  path = scheme.save(args.output)
  print(json.dumps({
      "saved": path, "scheme": scheme.name, "documents": scheme.num_docs,
      "added_tokens": len(scheme.added_tokens()), "fingerprint": scheme.fingerprint,
      "examples": {scheme.doc_ids[i]: scheme.doc_identifiers(i)[:2] for i in range(min(3, scheme.num_docs))},
      "report": getattr(scheme, "report", {}),
  }, indent=1, ensure_ascii=False))
  return 0
