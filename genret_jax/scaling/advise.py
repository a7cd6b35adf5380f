"""`genret advise`: the (N, D, beam) that minimises predicted CGL under a training + inference FLOP budget.

Model of the objective (documented in docs/scaling.md, "Compute-optimal advice"):

  predicted(N, D, beam) = L(N, D) * m(beam),      m(beam) = E(beam) / E(beam_ref)

  L(N, D)  the fitted joint law of CGL (fits.json from `genret report`, or fitted here from results.csv);
  E(beam)  the fitted power law of the retrieval error 1 - Recall@k against beam (the report's
           `error_vs_beam` series at one model); beam_ref the beam at which the CGL cells were scored
           (the smallest beam of the family's beam series).

CGL is teacher-forced, so a model's CGL itself does not change with beam; beam enters only through the
multiplier, i.e. we assume the relative error reduction bought by a wider beam is the same for every (N, D)
(a separable law). Without a beam law, m = 1 and the advice is the smallest allowed beam.

Cost:  train_flops(N, D) + num_queries * decode_flops_per_query(N, beam) <= budget, with
  train_flops(N, D) = k_train * N * D                     (k_train = 6 * tokens per example), and
  decode_flops_per_query(N, beam) = k_decode * N * beam   (k_decode = 2 * decoded tokens),
both coefficients taken from the sweep's own FLOP columns (median ratios) unless given. The Python API
takes arbitrary callables; train FLOPs must be proportional to D (any per-example cost is). L falls with D,
so the optimum spends all the budget left after inference on training: D = (budget - inference) / k(N).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import numpy as np
from scipy import optimize

from genret_jax import atomic_files, filesystem
from genret_jax.errors import InputError, check_int
from genret_jax.scaling import fits as fits_lib
from genret_jax.scaling import results as results_lib

DEFAULT_BEAMS = (1, 2, 5, 10, 20, 50, 100)


@dataclasses.dataclass
class ComputeModel:
  """FLOP costs. `train_flops(N, D)` must be proportional to D; `decode_flops_per_query(N, beam)` per query."""

  train_flops: Callable[[float, float], float]
  decode_flops_per_query: Callable[[float, int], float]
  num_queries: float

  @classmethod
  def linear(cls, train_flops_per_param_example: float, decode_flops_per_param_beam: float,
             num_queries: float) -> "ComputeModel":
    return cls(lambda n, d: train_flops_per_param_example * n * d,
               lambda n, b: decode_flops_per_param_beam * n * b, float(num_queries))

  def inference_flops(self, n: float, beam: int) -> float:
    return self.num_queries * self.decode_flops_per_query(n, beam)


def _predict(joint: fits_lib.FitResult, n: float, d: float) -> float:
  return float(joint.predict(np.array([[n, d]]))[0])


def advise(joint: fits_lib.FitResult, budget: float, compute: ComputeModel, *, beams: Sequence[int] = DEFAULT_BEAMS,
           n_range: tuple[float, float], beam_fit: fits_lib.FitResult | None = None, beam_ref: int | None = None,
           max_examples: float | None = None, grid_points: int = 400,
           observed: dict[str, Sequence[float]] | None = None) -> dict:
  """Compute-optimal (N, D, beam) for `budget` FLOPs; see the module docstring for the model.

  Returns {"best": {...}, "per_beam": [...], "assumptions": [...], "warnings": [...]}; each candidate holds
  N, D, beam, score (= predicted_cgl * beam_multiplier, the minimised objective), predicted_cgl (= L(N, D)),
  beam_multiplier, train_flops, inference_flops. With a beam law the score is a CGL-equivalent, not a CGL.
  """
  if joint.form != "joint":
    raise InputError(f"advice needs a joint L(N, D) law, got a {joint.form!r} fit", key="fit")
  if not budget > 0:
    raise InputError(f"budget must be > 0 FLOPs, got {budget}", key="budget")
  lo, hi = float(n_range[0]), float(n_range[1])
  if not 0 < lo < hi:
    raise InputError(f"bad N range {n_range}", key="n_range")
  if beam_fit is not None and beam_ref is None:
    raise InputError("beam_ref is needed with a beam law", key="beam_ref")
  ref_err = float(beam_fit.predict([beam_ref])[0]) if beam_fit is not None else 1.0
  warnings: list[str] = []
  if beam_fit is not None and not ref_err > 0:
    warnings.append(f"beam law predicts error {ref_err:.4g} <= 0 at beam {beam_ref}; beam multiplier disabled")
    beam_fit = None

  def multiplier(beam: int) -> float:
    if beam_fit is None:
      return 1.0
    return max(float(beam_fit.predict([beam])[0]), 0.0) / ref_err

  def candidate(log_n: float, beam: int) -> dict | None:
    n = math.exp(log_n)
    inference = compute.inference_flops(n, beam)
    remaining = budget - inference
    per_example = compute.train_flops(n, 1.0)
    if remaining <= 0 or per_example <= 0:
      return None
    d = remaining / per_example
    if max_examples is not None:
      d = min(d, float(max_examples))
    cgl = _predict(joint, n, d)
    if not math.isfinite(cgl):
      return None
    m = multiplier(beam)
    return {"N": n, "D": d, "beam": int(beam), "score": cgl * m, "predicted_cgl": cgl,
            "beam_multiplier": m, "train_flops": compute.train_flops(n, d), "inference_flops": inference}

  per_beam = []
  grid = np.linspace(math.log(lo), math.log(hi), grid_points)
  for beam in sorted(set(int(b) for b in beams)):
    cands = [c for c in (candidate(g, beam) for g in grid) if c is not None]
    if not cands:
      continue
    i = int(np.argmin([c["score"] for c in cands]))
    best = cands[i]
    # Refine between the grid neighbours of the best grid point.
    step = grid[1] - grid[0] if grid_points > 1 else 0.0
    a, b = math.log(best["N"]) - step, math.log(best["N"]) + step
    a, b = max(a, grid[0]), min(b, grid[-1])
    if b > a:
      res = optimize.minimize_scalar(lambda v: (candidate(v, beam) or {"score": math.inf})["score"],
                                     bounds=(a, b), method="bounded", options={"xatol": 1e-6})
      refined = candidate(float(res.x), beam)
      if refined is not None and refined["score"] <= best["score"]:
        best = refined
    if best["N"] >= hi * 0.999 or best["N"] <= lo * 1.001:
      best["at_n_bound"] = True
    per_beam.append(best)
  if not per_beam:
    raise InputError(f"budget {budget:.3g} FLOPs does not cover inference for any N >= {lo:.3g} and beam in "
                     f"{list(beams)}", key="budget")
  best = min(per_beam, key=lambda c: c["score"])
  if best.get("at_n_bound"):
    warnings.append(f"optimum N = {best['N']:.4g} sits on the edge of the searched range [{lo:.3g}, {hi:.3g}]")
  if observed:
    for key in ("N", "D"):
      rng = observed.get(key)
      if rng and (best[key] > 10 * max(rng) or best[key] < min(rng) / 10):
        warnings.append(f"{key} = {best[key]:.4g} is more than 10x outside the fitted range "
                        f"[{min(rng):.4g}, {max(rng):.4g}]: an extrapolation")
  assumptions = [
      "predicted = L(N, D) * m(beam); L is the fitted joint CGL law, m(beam) = E(beam) / E(beam_ref) with E the "
      "fitted power law of 1 - Recall@k vs beam (m = 1 without a beam law)",
      "train FLOPs proportional to N * D; decode FLOPs per query proportional to N * beam; all budget left "
      "after inference goes to training examples",
      f"beam_ref = {beam_ref}" if beam_fit is not None else "no beam law: beam only costs inference FLOPs",
  ]
  return {"budget": float(budget), "best": best, "per_beam": per_beam, "assumptions": assumptions,
          "warnings": warnings}


def _load_fits(args) -> dict:
  if args.fit:
    path = args.fit
    if filesystem.isdir(path):
      path = os.path.join(path, "fits.json")
    if not filesystem.exists(path):
      raise InputError("fits file not found", path=path)
    if args.beam_metric is not None:   # it was ignored: fits.json holds the beam law `genret report` fitted
      raise InputError("applies only with --results (the beam law in fits.json is the one `genret report "
                       "--beam_metric` fitted)", key="beam_metric")
    return results_lib.read_json(path)
  from genret_jax.scaling import report  # fit on the fly, without bootstrap or plots.
  path = args.results
  run_dir = path if filesystem.isdir(path) else os.path.dirname(filesystem.abspath(path))
  rows = results_lib.load_results(path)
  beam_metric = args.beam_metric or "recall@10"
  # As in `genret report`: an unknown metric silently gave "no beam law" advice.
  results_lib.require_column(rows, beam_metric, "beam_metric")
  cfg = report.ReportConfig(restarts=args.restarts, seed=args.seed, bootstrap_resamples=0, plots=False,
                            beam_metric=beam_metric)
  series = report.select_series(rows, run_dir, cfg.beam_metric)
  fitted, notes = report.fit_all(series, cfg)
  return {"flops": report.flops_coefficients(rows), "notes": notes,
          "families": {fam: {"beams": [int(r["beam"]) for r in series[fam]["beam_rows"]],
                             "range": {"N": [float(min(r["n_nonembed"] for r in rows if r["family"] == fam)),
                                             float(max(r["n_nonembed"] for r in rows if r["family"] == fam))],
                                       "D": [float(min(r["D"] for r in rows if r["family"] == fam)),
                                             float(max(r["D"] for r in rows if r["family"] == fam))]},
                             "fits": {k: (v.to_dict() if v is not None else None) for k, v in f.items()}}
                       for fam, f in fitted.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--fit", help="fits.json written by `genret report` (or its run directory)")
  src.add_argument("--results", help="results.csv (or run directory) to fit here, without CIs")
  parser.add_argument("--budget", type=float, required=True, help="total FLOPs: training + inference")
  parser.add_argument("--queries", type=float, required=True, help="queries served (inference FLOPs multiplier)")
  parser.add_argument("--family", default=None, help="model family (default: every family with a joint law)")
  parser.add_argument("--tokens_per_example", type=float, default=None,
                      help="training tokens per example: train FLOPs = 6 N D tokens (default: from the sweep)")
  parser.add_argument("--decode_tokens", type=float, default=None,
                      help="decoded tokens per beam: decode FLOPs/query = 2 N beam tokens (default: from the sweep)")
  parser.add_argument("--beams", default=None, help="comma-separated beams to consider (default: the sweep's)")
  parser.add_argument("--n_min", type=float, default=None, help="smallest N searched (default: observed / 10)")
  parser.add_argument("--n_max", type=float, default=None, help="largest N searched (default: observed x 10)")
  parser.add_argument("--max_examples", type=float, default=None, help="cap on D (e.g. the corpus' pairs)")
  parser.add_argument("--no_beam_law", action="store_true", help="ignore the beam law (m = 1)")
  parser.add_argument("--beam_metric", default=None,
                      help="with --results: metric of the beam law (default recall@10)")
  parser.add_argument("--restarts", type=int, default=fits_lib.DEFAULT_RESTARTS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=None, help="also write the advice JSON here")


def _check_args(args: argparse.Namespace) -> list[int] | None:
  """The options' ranges (beam 0 was chosen as "best" with a NaN score; negative queries gave negative FLOPs)."""
  for name in ("budget", "queries", "tokens_per_example", "decode_tokens", "n_min", "n_max", "max_examples"):
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and value > 0):
      raise InputError(f"must be a positive number, got {value}", key=name)
  if args.n_min and args.n_max and args.n_min >= args.n_max:
    raise InputError(f"--n_min {args.n_min} is not below --n_max {args.n_max}", key="n_min")
  if args.beams is None:
    return None
  try:
    beams = [int(b) for b in args.beams.split(",")]
  except ValueError as e:
    raise InputError(f"comma-separated integers expected, got {args.beams!r}", key="beams") from e
  for b in beams:
    check_int(b, "beams")
  return beams


def run(args: argparse.Namespace) -> int:
  given_beams = _check_args(args)
  data = _load_fits(args)
  families = data.get("families") or {}
  if args.family is not None and args.family not in families:
    raise InputError(f"family {args.family!r} not in the fits ({sorted(families)})", key="family")
  flops = data.get("flops") or {}
  k_train = 6.0 * args.tokens_per_example if args.tokens_per_example else flops.get("train_flops_per_param_example")
  k_dec = 2.0 * args.decode_tokens if args.decode_tokens else flops.get("decode_flops_per_param_beam")
  if not k_train:
    raise InputError("no training FLOPs in the sweep: pass --tokens_per_example", key="tokens_per_example")
  if not k_dec:
    raise InputError("no decode FLOPs in the sweep: pass --decode_tokens", key="decode_tokens")
  compute = ComputeModel.linear(float(k_train), float(k_dec), args.queries)
  out = {"budget": args.budget, "queries": args.queries, "train_flops_per_param_example": k_train,
         "decode_flops_per_param_beam": k_dec, "families": {}}
  for fam in ([args.family] if args.family else sorted(families)):
    info = families[fam]
    fam_fits = info.get("fits") or {}
    if not fam_fits.get("joint"):
      out["families"][fam] = {"skipped": "no joint L(N, D) law (see the report's notes)"}
      continue
    joint = fits_lib.FitResult.from_dict(fam_fits["joint"])
    beam_fit = None if args.no_beam_law or not fam_fits.get("error_vs_beam") else \
        fits_lib.FitResult.from_dict(fam_fits["error_vs_beam"])
    sweep_beams = info.get("beams") or []
    beams = given_beams or sweep_beams or list(DEFAULT_BEAMS)
    n_obs = info.get("range", {}).get("N") or [joint.params["B"], joint.params["B"]]
    n_range = (args.n_min or min(n_obs) / 10.0, args.n_max or max(n_obs) * 10.0)
    out["families"][fam] = advise(joint, args.budget, compute, beams=beams, n_range=n_range, beam_fit=beam_fit,
                                  beam_ref=min(sweep_beams) if sweep_beams else 1,
                                  max_examples=args.max_examples, observed=info.get("range"))
  advised = {f: v for f, v in out["families"].items() if "best" in v}
  if advised:
    out["best_family"] = min(advised, key=lambda f: advised[f]["best"]["score"])
  text = json.dumps(out, indent=2)
  if args.output:
    atomic_files.write_json(args.output, out, indent=2)
  print(text)
  return 0 if advised else 1
