"""`genret train`: gin-configured training (t5x's train.py conventions)."""

from __future__ import annotations

import argparse
import logging
import os

import gin

from genret_jax import gin_utils, multihost
from genret_jax.errors import Preempted
from genret_jax.training import distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_utils.add_gin_arguments(parser)
  distributed.add_arguments(parser)


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if distributed.initialize_from_args(args):
    import jax
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} global devices", flush=True)
  # Importing the trainer registers its configurables before the gin files are parsed.
  from genret_jax.training import trainer  # noqa: F401
  from genret_jax.models import model_api  # noqa: F401
  # Before the first collective: processes given other gin files or bindings would build other models or input
  # streams and wait for each other forever (or, with matching shapes, train on a silent mix of two jobs).
  multihost.agree(lambda: gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths),
                  lambda _: gin.config_str(), what="reading the gin config",
                  differ="see another training job than process 0 (gin files or bindings differ): give every host "
                  "the same command")
  result = trainer.train()
  if result.preempted:
    raise Preempted(f"checkpoint saved at step {result.step}; run the same command again to resume")
  print(f"trained to step {result.step}: loss {result.last_loss:.4f}"
        + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        + f", {result.tokens_per_s:.0f} tokens/s; params in {os.path.join(result.model_dir, 'params')}")
  return 0
