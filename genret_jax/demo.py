"""`genret demo`: the main job on the embedded default corpus — a small scaling sweep (both families, several
size rungs, three data fractions, beams 1-20), then the report. A rerun resumes where it stopped. On several hosts
it takes `genret train`'s flags and runs as `genret sweep` does (genret_jax/scaling/sweep.py)."""

from __future__ import annotations

import argparse
import os
import time

from genret_jax import gin_utils


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from genret_jax.training import distributed
  gin_utils.add_gin_arguments(parser)
  distributed.add_arguments(parser)
  parser.add_argument("--output_dir", default=os.path.join("runs", "demo"),
                      help="Where the sweep and report go (default: runs/demo; a rerun resumes).")
  parser.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples in the report.")


def run(args) -> int:
  from genret_jax import multihost
  from genret_jax.errors import check_int
  from genret_jax.scaling import sweep
  from genret_jax.training import distributed

  check_int(args.bootstrap, "--bootstrap", low=0)   # before the sweep, not after it
  # Before anything touches the backend: otherwise every host ran the whole demo alone, as process 0 of 1.
  distributed.initialize_from_args(args)
  gin_files = args.gin_file or ["sweeps/demo.gin"]
  t0 = time.time()
  cfg, out = sweep.read_config(args, gin_files, {"command": "demo", "bootstrap": args.bootstrap})
  multihost.from_process_0(lambda: os.makedirs(out, exist_ok=True), what="creating the output directory")
  print(f"genret demo: sweep {gin_files} -> {out}", flush=True)
  sweep.run_sweep(cfg, out, config_path=",".join(gin_files))
  path = sweep.report_on_process_0(out, args.bootstrap)
  print(f"genret demo: done in {time.time() - t0:.0f}s; report: {path}", flush=True)
  return 0
