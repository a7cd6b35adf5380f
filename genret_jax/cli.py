"""`genret` console script. Each subcommand lives in its stage's module, which defines
`add_arguments(parser)` and `run(args) -> int`; modules are imported lazily so `genret --help` is fast."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Sequence

from genret_jax import host_malloc
from genret_jax.errors import InputError, Preempted
from genret_jax.gin_utils import rewrite_gin_args

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("genret_jax.corpora.inspect", "Print a JSON summary of a collection (BEIR dir, DPR TSV, JSONL, ...)."),
    "build-vocab": ("genret_jax.identifiers.vocab", "Train a SentencePiece vocabulary on a corpus."),
    "build-ids": ("genret_jax.identifiers.build_ids", "Build and save an identifier scheme for a corpus."),
    "convert-hf": ("genret_jax.models.hf_convert", "Convert a Hugging Face T5/LLaMA checkpoint to orbax + gin (and back)."),
    "model-info": ("genret_jax.models.info", "Parameter counts, FLOPs per token and parameter shardings of a gin model config."),
    "train": ("genret_jax.training.train", "Train a model on a seqio task or mixture (gin-configured)."),
    "train-compile": ("genret_jax.training.train_compile", "Compile the train step for a TPU slice you do not have: per-device memory and fit."),
    "build-index": ("genret_jax.decoding.build_index", "Build and save the decoding constraint (trie / suffix array)."),
    "retrieve": ("genret_jax.retrieval.run", "Constrained beam search + retrieval + IR metrics (gin-configured)."),
    "cgl": ("genret_jax.scaling.cgl_command", "Contrastive generation loss of a checkpoint (gin-configured)."),
    "sweep": ("genret_jax.scaling.sweep", "Run a scaling sweep over family x size x data fraction x beam."),
    "report": ("genret_jax.scaling.report", "Fit scaling laws over a sweep's results and write report.md with plots."),
    "advise": ("genret_jax.scaling.advise", "Compute-optimal (N, D, beam) for a FLOP budget from a fitted joint law."),
    "demo": ("genret_jax.demo", "The main job: a small end-to-end sweep on the embedded default corpus + report."),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="genret", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def _enable_compilation_cache() -> None:
  """Persistent XLA compilation cache: sweep cells of one rung, reruns and resumed jobs reuse compiled programs
  (compilation dominates small CPU models). JAX_COMPILATION_CACHE_DIR overrides; GENRET_NO_COMPILE_CACHE=1 disables."""
  import os
  if os.environ.get("GENRET_NO_COMPILE_CACHE") == "1":
    return
  default = os.path.join(os.environ.get("GENRET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "genret")),
                         "jax_compile")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", default)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    build_parser().print_help()
    if argv and argv[0] not in ("-h", "--help"):
      print(f"\ngenret: unknown command {argv[0]!r}", file=sys.stderr)
      return 2
    return 0
  name, rest = argv[0], rewrite_gin_args(argv[1:])
  host_malloc.configure()   # before any library starts a thread: see host_malloc's docstring
  _enable_compilation_cache()
  module = importlib.import_module(COMMANDS[name][0])
  parser = argparse.ArgumentParser(prog=f"genret {name}", description=COMMANDS[name][1])
  try:
    module.add_arguments(parser)   # inside: defaults read from the environment can be bad input too
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)
  except InputError as e:
    print(f"genret {name}: error: {e.text}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"genret {name}: preempted: {e}", file=sys.stderr)
    return Preempted.EXIT_CODE
  except RuntimeError as e:
    # gin's own check for a configurable's unbound gin.REQUIRED parameters (no run gin file given, say).
    if not str(e).startswith("Required bindings for"):
      raise
    print(f"genret {name}: error: gin config: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  except TypeError as e:
    # gin evaluates `%NAME` by calling its `macro` configurable in scope NAME: unbound, it lacks `value`.
    unbound = re.search(r"In call to configurable 'macro' .* in scope '([^']+)'", str(e))
    if unbound is None:
      raise
    print(f"genret {name}: error: gin config: macro %{unbound.group(1)} is used but never bound "
          f"(--gin.{unbound.group(1)}=... or a gin file)", file=sys.stderr)
    return 2
  except OSError as e:
    # gin re-raises an error from inside a configurable as a proxy without the OS fields; the original is its
    # __context__.
    while e.filename is None and isinstance(e.__context__, OSError):
      e = e.__context__
    if e.filename is None:
      raise
    # Output paths that are files, directories or unwritable: the OS's reason and the path, one line.
    print(f"genret {name}: error: {e.filename}: {e.strerror}", file=sys.stderr)
    return 2
  except Exception as e:   # pylint: disable=broad-except
    # A gs:// path (tf.io.gfile) that cannot be reached: no such bucket, no permission, a scheme TensorFlow does
    # not know. TensorFlow's errors are not OSErrors; their message names the path.
    if not _is_tensorflow_op_error(e):
      raise
    print(f"genret {name}: error: {e.message.splitlines()[0]}", file=sys.stderr)
    return 2


def _is_tensorflow_op_error(e: BaseException) -> bool:
  """isinstance(e, tf.errors.OpError) without importing TensorFlow (commands that never touched it)."""
  return any(c.__name__ == "OpError" and c.__module__.startswith("tensorflow.") for c in type(e).__mro__) and \
      isinstance(getattr(e, "message", None), str)


if __name__ == "__main__":
  sys.exit(main())
