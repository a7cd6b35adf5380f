"""`genret inspect PATH`: print a JSON summary of a collection (documents, queries per split, judgments, tokens).

Examples:
  genret inspect ../shared/data/cranfield
  genret inspect psgs_w100.tsv --max-docs 100000 --questions nq-test.qa.csv
  genret inspect default
"""

from __future__ import annotations

import argparse
import json
import sys

from genret_jax import corpora
from genret_jax.corpora import stats
from genret_jax.errors import check_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n", 2)[2]
  parser.add_argument("path", help="BEIR directory, DPR passages TSV, JSONL corpus, 'default', or an ir_datasets "
                      "name (irds:NAME; read offline only)")
  parser.add_argument("--format", choices=corpora.FORMATS, default=None, help="skip format auto-detection")
  parser.add_argument("--normalize", action="store_true",
                      help="apply the reference's body normalisation (whitespace collapse, strip) before counting")
  parser.add_argument("--max-docs", type=int, default=None, help="read only the first N documents")
  parser.add_argument("--questions", action="append", default=[], metavar="FILE",
                      help="NQ DPR-style question file to attach (repeatable)")
  parser.add_argument("--questions-split", default="test", help="split of the attached questions (default: test)")
  parser.add_argument("--indent", type=int, default=2, help="JSON indent (0 = one line)")


def run(args: argparse.Namespace) -> int:
  kw = {"normalize": args.normalize}
  if args.max_docs is not None:
    kw["max_docs"] = check_int(args.max_docs, "--max-docs", 1)
  collection = corpora.load(args.path, format=args.format, **kw)
  for i, path in enumerate(args.questions):
    prefix = args.questions_split if len(args.questions) == 1 else f"{args.questions_split}{i}"
    collection = corpora.load_questions(path, collection, split=args.questions_split, id_prefix=prefix)
  summary = stats.summarize(collection)
  json.dump(summary, sys.stdout, indent=args.indent or None, ensure_ascii=False)
  sys.stdout.write("\n")
  return 0
