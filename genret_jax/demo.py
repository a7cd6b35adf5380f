"""`genret demo`: the main job on the embedded default corpus — a small scaling sweep (both families, several
size rungs, three data fractions, beams 1-20), then the report. A rerun resumes where it stopped."""

from __future__ import annotations

import argparse
import os
import time

from genret_jax import gin_utils


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_utils.add_gin_arguments(parser)
  parser.add_argument("--output_dir", default=os.path.join("runs", "demo"),
                      help="Where the sweep and report go (default: runs/demo; a rerun resumes).")
  parser.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples in the report.")


def run(args) -> int:
  from genret_jax.scaling import report, sweep

  gin_files = args.gin_file or ["sweeps/demo.gin"]
  t0 = time.time()
  gin_utils.parse_gin(gin_files, args.gin_bindings, args.gin_search_paths)
  cfg = sweep.SweepConfig()
  out = os.path.abspath(args.output_dir)
  os.makedirs(out, exist_ok=True)
  print(f"genret demo: sweep {gin_files} -> {out}", flush=True)
  sweep.run_sweep(cfg, out, config_path=",".join(gin_files))
  path = report.make_report(out, report.ReportConfig(bootstrap_resamples=args.bootstrap))
  print(f"genret demo: done in {time.time() - t0:.0f}s; report: {path}", flush=True)
  return 0
