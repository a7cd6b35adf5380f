"""`genret report RUN_DIR`: fit the scaling laws of a sweep and write RUN_DIR/report.md, fits.json and PNGs.

Input is the results format of docs/scaling.md (`results.py`). Series selected per family:
  cgl_vs_N  — models at the family's largest D, CGL against non-embedding parameters N;
  cgl_vs_D  — models at the N rung with the most data fractions, CGL against training examples D;
  joint     — every distinct (N, D) model, the joint law (needs >= 6 points);
  beam      — the (N, D) model with the most beam sizes: Recall@k and CGL against beam / decode FLOPs,
              and the power law of the retrieval error 1 - Recall@k against beam (used by `genret advise`).
CGL is teacher-forced, so it does not depend on beam: a model's CGL is read from its smallest-beam row.
Confidence intervals come from resampling queries (cells/<cell_id>/per_query.json); a series whose cells
lack per-query values is fitted without intervals and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from genret_jax import atomic_files, filesystem
from genret_jax.errors import InputError, check_int
from genret_jax.scaling import bootstrap
from genret_jax.scaling import cgl as cgl_lib
from genret_jax.scaling import fits as fits_lib
from genret_jax.scaling import results as results_lib

FITS_JSON = "fits.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"


@dataclasses.dataclass
class Series:
  """Points of one family along one axis, with the per-query values behind each point when available."""

  family: str
  name: str
  x: np.ndarray
  y: np.ndarray
  cell_ids: list[str]
  cells: list[np.ndarray] | None  # per-query values of y per point; None if any cell lacks them.
  y_ci: np.ndarray | None = None  # [num_points, 2] per-point bootstrap CI.
  fixed: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReportConfig:
  restarts: int = fits_lib.DEFAULT_RESTARTS
  seed: int = 0
  loss: str = "linear"
  f_scale: float | None = None
  bootstrap_resamples: int = 1000
  resample_restarts: int = 2
  resample_max_nfev: int = 100
  confidence: float = bootstrap.DEFAULT_CONFIDENCE
  beam_metric: str = "recall@10"
  extrapolate: float = 10.0  # predictions reported at this multiple of the largest observed x.
  plots: bool = True

  def __post_init__(self):
    for name, low in (("restarts", 1), ("bootstrap_resamples", 0), ("resample_restarts", 0),
                      ("resample_max_nfev", 1)):
      check_int(getattr(self, name), name, low)
    if self.f_scale is not None and not (math.isfinite(self.f_scale) and self.f_scale > 0):
      raise InputError(f"must be a positive number, got {self.f_scale}", key="f_scale")


def _models(rows: Sequence[dict]) -> dict[tuple[float, float], dict]:
  """(N, D) -> the smallest-beam row of that model (CGL is beam-independent)."""
  out: dict[tuple[float, float], dict] = {}
  for r in sorted(rows, key=lambda r: r["beam"]):
    out.setdefault((r["n_nonembed"], r["D"]), r)
  return out


def _per_query(run_dir: str, rows: Sequence[dict], metric: str,
               transform=None) -> list[np.ndarray] | None:
  cells = []
  for r in rows:
    pq = results_lib.load_per_query(run_dir, r["cell_id"])
    if pq is None or metric not in pq:
      return None
    v = np.asarray(pq[metric], dtype=np.float64)
    cells.append(transform(v) if transform else v)
  return cells


def _series(run_dir, family, name, rows, x_key, metric, transform=None, fixed=None) -> Series:
  x = np.array([r[x_key] for r in rows], dtype=np.float64)
  y = np.array([r[metric] for r in rows], dtype=np.float64)
  if transform is not None:
    y = transform(y)
  cells = _per_query(run_dir, rows, metric, transform)
  return Series(family, name, x, y, [r["cell_id"] for r in rows], cells, fixed=fixed or {})


def select_series(rows: Sequence[dict], run_dir: str, beam_metric: str = "recall@10") -> dict:
  """family -> {"cgl_vs_N", "cgl_vs_D", "joint", "beam_rows", "error_vs_beam", "error_vs_flops"}."""
  out: dict[str, dict[str, Any]] = {}
  for family in sorted({r["family"] for r in rows}):
    fam_rows = [r for r in rows if r["family"] == family]
    models = _models(fam_rows)
    sel: dict[str, Any] = {}
    d_max = max(d for _, d in models)
    by_n = sorted((r for (n, d), r in models.items() if d == d_max), key=lambda r: r["n_nonembed"])
    sel["cgl_vs_N"] = _series(run_dir, family, "cgl_vs_N", by_n, "n_nonembed", "cgl", fixed={"D": d_max})
    ds_per_n: dict[float, list[dict]] = {}
    for (n, _), r in models.items():
      ds_per_n.setdefault(n, []).append(r)
    n_star = max(ds_per_n, key=lambda n: (len(ds_per_n[n]), n))
    by_d = sorted(ds_per_n[n_star], key=lambda r: r["D"])
    sel["cgl_vs_D"] = _series(run_dir, family, "cgl_vs_D", by_d, "D", "cgl", fixed={"N": n_star})
    # The other sizes' data axes, plotted (not fitted) beside it: how the gain from D depends on N.
    sel["cgl_vs_D_other_n"] = {
        n: _series(run_dir, family, "cgl_vs_D", sorted(rs, key=lambda r: r["D"]), "D", "cgl", fixed={"N": n})
        for n, rs in sorted(ds_per_n.items()) if n != n_star and len(rs) >= 2}
    joint_rows = sorted(models.values(), key=lambda r: (r["n_nonembed"], r["D"]))
    joint = _series(run_dir, family, "joint", joint_rows, "n_nonembed", "cgl")
    joint.x = np.array([[r["n_nonembed"], r["D"]] for r in joint_rows], dtype=np.float64)
    sel["joint"] = joint
    beams_per_model: dict[tuple[float, float], list[dict]] = {}
    for r in fam_rows:
      beams_per_model.setdefault((r["n_nonembed"], r["D"]), []).append(r)
    key = max(beams_per_model, key=lambda k: (len({r["beam"] for r in beams_per_model[k]}), k))
    beam_rows = sorted({r["beam"]: r for r in beams_per_model[key]}.values(), key=lambda r: r["beam"])
    sel["beam_rows"] = beam_rows
    sel["beam_model"] = {"N": key[0], "D": key[1]}
    if beam_rows and not all(math.isnan(r.get(beam_metric, math.nan)) for r in beam_rows):
      err = lambda v: 1.0 - v  # noqa: E731
      ok = [r for r in beam_rows if not math.isnan(r.get(beam_metric, math.nan))]
      sel["error_vs_beam"] = _series(run_dir, family, "error_vs_beam", ok, "beam", beam_metric, err,
                                     fixed={"N": key[0], "D": key[1]})
      ok_f = [r for r in ok if r["decode_flops_per_query"] > 0]
      if len(ok_f) == len(ok):
        sel["error_vs_flops"] = _series(run_dir, family, "error_vs_flops", ok_f, "decode_flops_per_query",
                                        beam_metric, err, fixed={"N": key[0], "D": key[1]})
    out[family] = sel
  return out


def _set_point_cis(s: Series, cfg: ReportConfig) -> None:
  """Each point's bootstrap CI over its queries (the error bars)."""
  s.y_ci = np.array([bootstrap.mean_ci(c, cfg.bootstrap_resamples, cfg.seed, cfg.confidence)[1:] for c in s.cells])


def _fit_series(s: Series, form: str, cfg: ReportConfig, notes: list[str], predict_at=None):
  """Fit with CIs when per-query values exist; None (with a note) when the series is too short or fails."""
  x = s.x
  n_unique = len({tuple(np.atleast_1d(v)) for v in x})
  n_params = len(fits_lib.get_form(form).param_names)
  if n_unique < n_params:
    notes.append(f"{s.family} {s.name}: {n_unique} distinct point(s) < {n_params} parameters, not fitted.")
    return None
  exact = n_unique == n_params
  if exact:
    # Not necessarily R² = 1: three points that fall faster at large x have no power law through them.
    notes.append(f"{s.family} {s.name}: {n_unique} points for {n_params} parameters — no degrees of freedom left, "
                 "treat the fit as interpolation; no parameter CIs.")
  try:
    if s.cells is not None and cfg.bootstrap_resamples > 0:
      _set_point_cis(s, cfg)
    if s.cells is not None and cfg.bootstrap_resamples > 0 and not exact:
      return fits_lib.bootstrap_fit(form, x, s.cells, restarts=cfg.restarts, seed=cfg.seed, loss=cfg.loss,
                                    f_scale=cfg.f_scale, num_resamples=cfg.bootstrap_resamples,
                                    resample_restarts=cfg.resample_restarts,
                                    resample_max_nfev=cfg.resample_max_nfev, confidence=cfg.confidence,
                                    predict_at=predict_at, x_name=s.name.split("_vs_")[-1], y_name="cgl")
    if s.cells is None and cfg.bootstrap_resamples > 0:
      notes.append(f"{s.family} {s.name}: no per-query values for every cell, fitted without CIs.")
    f = fits_lib.fit(form, x, s.y, restarts=cfg.restarts, seed=cfg.seed, loss=cfg.loss, f_scale=cfg.f_scale)
    if predict_at is not None:
      f.predictions = [{"x": (v if np.ndim(v) == 0 else list(v)), "y": float(p), "ci": None}
                       for v, p in zip(np.asarray(predict_at).tolist(), f.predict(predict_at))]
    return f
  except InputError as e:
    # The message alone: the error's "config key fit:" prefix reads as a configuration problem in a report.
    notes.append(f"{s.family} {s.name}: fit failed ({e.message}).")
    return None


def fit_all(series: dict, cfg: ReportConfig) -> tuple[dict, list[str]]:
  """family -> {series name -> FitResult or None}, and notes."""
  notes: list[str] = []
  out: dict[str, dict[str, fits_lib.FitResult | None]] = {}
  for family, sel in series.items():
    fam: dict[str, fits_lib.FitResult | None] = {}
    for name in ("cgl_vs_N", "cgl_vs_D", "error_vs_beam", "error_vs_flops"):
      if name in sel:
        s = sel[name]
        fam[name] = _fit_series(s, "power", cfg, notes, predict_at=[float(np.max(s.x)) * cfg.extrapolate])
    j = sel["joint"]
    if len({float(v) for v in j.x[:, 0]}) > 1 and len({float(v) for v in j.x[:, 1]}) > 1:
      nmax, dmax = j.x.max(axis=0)
      fam["joint"] = _fit_series(j, "joint", cfg, notes, predict_at=[[nmax * cfg.extrapolate, dmax]])
    else:
      notes.append(f"{family} joint: N or D never varies, joint law not fitted.")
      fam["joint"] = None
    out[family] = fam
  return out, notes


def matched_pairs(series: dict, cfg: ReportConfig) -> list[dict]:
  """Across families, each model's nearest-N partner within a factor 2, with the paired CGL difference CI."""
  fams = sorted(series)
  pairs = []
  for i, fa in enumerate(fams):
    for fb in fams[i + 1:]:
      sa, sb = series[fa]["cgl_vs_N"], series[fb]["cgl_vs_N"]
      for ia, na in enumerate(sa.x):
        ib = int(np.argmin(np.abs(np.log(sb.x) - np.log(na))))
        nb = sb.x[ib]
        if abs(math.log(nb / na)) > math.log(2.0):
          continue
        p = {"family_a": fa, "family_b": fb, "n_a": float(na), "n_b": float(nb), "cgl_a": float(sa.y[ia]),
             "cgl_b": float(sb.y[ib]), "diff": float(sa.y[ia] - sb.y[ib]), "diff_ci": None}
        if sa.cells is not None and sb.cells is not None:
          p["diff_ci"] = _paired_diff_ci(sa.cells[ia], sb.cells[ib], cfg)
        pairs.append(p)
  return pairs


def _paired_diff_ci(a: np.ndarray, b: np.ndarray, cfg: ReportConfig) -> list[float] | None:
  """CI of mean(a) - mean(b) from a bootstrap of the per-query differences, when both cells hold the same
  queries (and, from one sweep, the same negatives); None when their query counts differ or the report runs
  without a bootstrap (`bootstrap_resamples` 0, as `genret advise` does)."""
  if a.size != b.size or cfg.bootstrap_resamples == 0:
    return None
  _, lo, hi = bootstrap.mean_ci(a - b, cfg.bootstrap_resamples, cfg.seed, cfg.confidence)
  return [lo, hi]


def axis_steps(series: dict, cfg: ReportConfig) -> list[dict]:
  """Within each family, the CGL change from each point to the next along N (at the largest D) and along D (at
  every N with >= 2 data fractions), and from the first point to the last where an axis has >= 3, with paired
  CIs. A sweep too small or too early for a law still answers these (is the larger model better, does more data
  help at this size), and the pairing over shared queries and negatives makes the CIs far narrower than the
  points' own (session 17's Cranfield reading came from an ad-hoc script that did this)."""
  out = []
  for family, sel in series.items():
    d_axes = {sel["cgl_vs_D"].fixed["N"]: sel["cgl_vs_D"], **sel["cgl_vs_D_other_n"]}
    axes = [("N", sel["cgl_vs_N"])] + [("D", d_axes[n]) for n in sorted(d_axes)]
    for axis, s in axes:
      n = len(s.x)
      for i, j in [(i, i + 1) for i in range(n - 1)] + ([(0, n - 1)] if n >= 3 else []):
        step = {"family": family, "axis": axis, "fixed": {k: float(v) for k, v in s.fixed.items()},
                "from": float(s.x[i]), "to": float(s.x[j]), "cgl_from": float(s.y[i]), "cgl_to": float(s.y[j]),
                "diff": float(s.y[j] - s.y[i]), "diff_ci": None}
        if s.cells is not None:
          step["diff_ci"] = _paired_diff_ci(s.cells[j], s.cells[i], cfg)
        out.append(step)
  return out


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    if math.isnan(v):
      return ""
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.7g}"
    return f"{v:.4g}"
  return str(v)


def _ci(ci, fmt=_fmt) -> str:
  # An undefined bound (the bootstrap refits ran off to +-inf) says "n/a" rather than vanishing from the table.
  bound = lambda v: "n/a" if isinstance(v, float) and math.isnan(v) else fmt(v)
  return "" if not ci else f"[{bound(ci[0])}, {bound(ci[1])}]"


def _percent(cfg: ReportConfig) -> str:
  """The confidence level as the tables print it ("95%"); rounded, as int(0.57 * 100) is 56."""
  return f"{round(cfg.confidence * 100, 1):g}%"


def _diff(value: float, ci) -> str:
  """A paired difference and its CI to 3 significant digits: `-3.43e-05 [-5.01e-05, -1.98e-05]`."""
  fmt = lambda v: f"{v:.3g}"  # noqa: E731
  return f"{fmt(value)} {_ci(ci, fmt)}".strip()


def _results_table(rows: Sequence[dict]) -> list[str]:
  cols = ["family", "n_nonembed", "D", "data_fraction", "beam", "cgl", "ce", "recall@1", "recall@10",
          "recall@100", "mrr@10", "ndcg@10", "train_flops", "decode_flops_per_query", "wall_s", "cell_id"]
  cols = [c for c in cols if any(r.get(c) not in (None, "") and not (isinstance(r.get(c), float)
                                                                      and math.isnan(r.get(c))) for r in rows)]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in sorted(rows, key=lambda r: (r["family"], r["n_nonembed"], r["D"], r["beam"])):
    lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
  return lines


_TITLES = {"cgl_vs_N": "CGL vs N", "cgl_vs_D": "CGL vs D", "joint": "CGL vs (N, D)",
           "error_vs_beam": "1 - {m} vs beam", "error_vs_flops": "1 - {m} vs decode FLOPs"}


def _fits_section(fitted: dict, verdicts: dict, cfg: ReportConfig) -> list[str]:
  lines = [f"| family | series | law | R² | points | parameters ({_percent(cfg)} CI) | prediction at extrapolated x "
           "(CI) |",
           "|---|---|---|---|---|---|---|"]
  for family, fam in fitted.items():
    for name, f in fam.items():
      title = _TITLES[name].format(m=cfg.beam_metric)
      if f is None:
        lines.append(f"| {family} | {title} | not fitted (see notes) | | | | |")
        continue
      params = "; ".join(f"{k} = {_fmt(v)} {_ci((f.param_ci or {}).get(k))}".strip() for k, v in f.params.items())
      pred = ""
      if f.predictions:
        p = f.predictions[0]
        x = p["x"] if not isinstance(p["x"], list) else "(" + ", ".join(_fmt(float(v)) for v in p["x"]) + ")"
        pred = f"x = {_fmt(x) if not isinstance(x, str) else x}: {_fmt(p['y'])} {_ci(p['ci'])}"
      law = f"`{f.formula()}`"
      problem, caveat = verdicts[family][name]
      if problem:
        law += f" **unreliable: {problem}**"
      elif caveat:
        law += f" *(trend only: {caveat})*"
      lines.append(f"| {family} | {title} | {law} | {f.r2:.5f} | {f.num_points} | {params} | {pred} |")
  return lines


# The exponents of each law form: a bootstrap CI that reaches 0 leaves the direction of the trend open.
_EXPONENTS = {"power": ("b",), "joint": ("alpha", "beta")}


def fit_problem(f) -> str:
  """Why a fitted law should not be read as a trend ('' when nothing is wrong). Noisy, flat or tiny series still
  give *some* least-squares optimum; the report says so instead of printing it as a law."""
  values = [float(v) for v in f.params.values()]
  if not all(math.isfinite(v) for v in values):
    return "a parameter is not finite (no power-law trend in these points)"
  if not math.isfinite(f.r2) or f.r2 < 0.5:
    return f"R² = {f.r2:.3g} (the law explains little of the variation)"
  if f.num_points <= len(values):
    return f"{f.num_points} points for {len(values)} parameters (an interpolation, not evidence)"
  # A good R² with an exponent whose bootstrap CI reaches 0 (or is undefined) is a curve through these points,
  # not a measured trend: resampling the queries finds laws that rise, fall or stay flat.
  for name in _EXPONENTS.get(f.law.name, ()):
    ci = (f.param_ci or {}).get(name)
    if ci is None:
      continue
    lo, hi = float(ci[0]), float(ci[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0 <= hi:
      level = f"{100 * f.confidence:.0f}% " if f.confidence else ""
      return f"the exponent {name}'s {level}CI {_ci(ci)} includes 0 or is undefined (no trend established)"
  return ""


# The law's additive constant: the asymptote (irreducible loss) the paper reads off a fit.
_OFFSETS = {"power": "c", "joint": "delta"}


def fit_caveat(f, y) -> str:
  """Why the asymptote of an otherwise sound fit should not be read ('' when it can be): when the bootstrap CI of
  c (delta) is many times wider than the fitted points' own range, the points fix a trend but not where it levels
  off (e.g. the b -> 0 side of the law, about linear in log x: session 17's Cranfield data axis read
  c = 7.7e-5 with CI [-0.0054, 0.0036] over points 0.00345-0.00354)."""
  name = _OFFSETS.get(f.law.name)
  ci = (f.param_ci or {}).get(name)
  span = float(np.ptp(np.asarray(y, dtype=np.float64)))
  if ci is None or span <= 0:
    return ""
  lo, hi = float(ci[0]), float(ci[1])
  width = hi - lo if math.isfinite(lo) and math.isfinite(hi) else math.inf
  if width <= 10 * span:
    return ""
  times = "unbounded" if math.isinf(width) else f"{width / span:.0f}x the points' range"
  return f"{name}'s CI {_ci(ci)} is {times}; the asymptote is not identified"


def fit_verdicts(fitted: dict, series: dict) -> dict[str, dict[str, tuple[str, str]]]:
  """family -> series name -> (fit_problem, fit_caveat) of every fitted law (the caveat '' where there is a
  problem), evaluated once for the table, fits.json and the plots' legends."""
  out: dict[str, dict[str, tuple[str, str]]] = {}
  for family, fam in fitted.items():
    for name, f in fam.items():
      if f is not None:
        problem = fit_problem(f)
        out.setdefault(family, {})[name] = (problem, "" if problem else fit_caveat(f, series[family][name].y))
  return out


def _remark(verdict: tuple[str, str] | None) -> str:
  """A verdict in one word or two, for a plot's legend."""
  problem, caveat = verdict or ("", "")
  return "unreliable" if problem else ("trend only" if caveat else "")


def _chance(rows: Sequence[dict], run_dir: str) -> float:
  for r in rows:
    pq = results_lib.load_per_query(run_dir, r["cell_id"])
    if pq and "num_negatives" in pq:
      return cgl_lib.chance_cgl(int(pq["num_negatives"]))
  return cgl_lib.chance_cgl()


def make_report(run_dir: str | os.PathLike, cfg: ReportConfig | None = None) -> str:
  """Reads RUN_DIR/results.csv, fits, writes report.md, fits.json and plots/*.png; returns report.md's path.
  RUN_DIR may be a URL (gs://)."""
  cfg = cfg or ReportConfig()
  run_dir = filesystem.abspath(run_dir)
  if os.path.basename(run_dir) == results_lib.RESULTS_CSV and filesystem.isfile(run_dir):   # the table: its dir
    run_dir = os.path.dirname(run_dir)
  rows = results_lib.load_results(run_dir)
  if cfg.beam_metric not in rows[0]:   # an unknown metric made the beam fits vanish without a note
    have = sorted(k for k in rows[0] if k in results_lib.METRIC_COLUMNS or "@" in k)
    raise InputError(f"no column {cfg.beam_metric!r} in {results_lib.RESULTS_CSV} (have {have})", key="beam_metric")
  series = select_series(rows, run_dir, cfg.beam_metric)
  fitted, notes = fit_all(series, cfg)
  verdicts = fit_verdicts(fitted, series)
  pairs = matched_pairs(series, cfg)
  steps = axis_steps(series, cfg)
  chance = _chance(rows, run_dir)

  flops = flops_coefficients(rows)
  payload = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "config": dataclasses.asdict(cfg), "chance_cgl": chance, "flops": flops,
             "families": {fam: {"beam_model": series[fam]["beam_model"],
                                "beams": [int(r["beam"]) for r in series[fam]["beam_rows"]],
                                "range": {"N": [float(min(r["n_nonembed"] for r in rows if r["family"] == fam)),
                                                float(max(r["n_nonembed"] for r in rows if r["family"] == fam))],
                                          "D": [float(min(r["D"] for r in rows if r["family"] == fam)),
                                                float(max(r["D"] for r in rows if r["family"] == fam))]},
                                "fits": {k: (v.to_dict() if v is not None else None) for k, v in fam_fits.items()},
                                "fit_problems": {k: p for k, (p, _) in verdicts.get(fam, {}).items() if p},
                                "fit_caveats": {k: c for k, (_, c) in verdicts.get(fam, {}).items() if c}}
                          for fam, fam_fits in fitted.items()},
             "matched_pairs": pairs, "axis_steps": steps, "notes": notes}
  atomic_files.write_json(os.path.join(run_dir, FITS_JSON), payload, indent=2)

  pngs: list[tuple[str, str]] = []
  if cfg.plots:
    from genret_jax.scaling import plots  # matplotlib only when plotting.
    pdir = os.path.join(run_dir, PLOTS_DIR)
    for name, xl, fname in (("cgl_vs_N", "non-embedding parameters N", "cgl_vs_n.png"),
                            ("cgl_vs_D", "training examples D", "cgl_vs_d.png")):
      shown = {f: series[f][name] for f in series}
      laws = {f: fitted[f].get(name) for f in series}
      remarks = {f: _remark(verdicts.get(f, {}).get(name)) for f in series}
      if name == "cgl_vs_D":
        for f in series:
          if series[f]["cgl_vs_D_other_n"]:   # several sizes on one plot: each labelled with its N
            key = f"{f} N={_fmt(series[f][name].fixed['N'])}"
            shown[key], laws[key], remarks[key] = shown.pop(f), laws.pop(f), remarks.pop(f)
          for n, other in series[f]["cgl_vs_D_other_n"].items():
            if other.cells is not None and cfg.bootstrap_resamples > 0:
              _set_point_cis(other, cfg)
            shown[f"{f} N={_fmt(n)}"] = other
      plots.law_plot(os.path.join(pdir, fname), shown, laws, x_label=xl, title=_TITLES[name], chance=chance, remarks=remarks)
      pngs.append((_TITLES[name], f"{PLOTS_DIR}/{fname}"))
    recall_keys = [k for k in ("recall@1", "recall@10", "recall@100")
                   if any(not math.isnan(r.get(k, math.nan)) for r in rows)]
    plots.beam_plot(os.path.join(pdir, "beam.png"), {f: series[f]["beam_rows"] for f in series}, recall_keys,
                    {f: fitted[f].get("error_vs_beam") for f in series}, cfg.beam_metric,
                    remarks={f: _remark(verdicts.get(f, {}).get("error_vs_beam")) for f in series})
    pngs.append(("Recall@k and CGL vs beam size and decode FLOPs", f"{PLOTS_DIR}/beam.png"))
    if len(series) > 1:
      plots.family_plot(os.path.join(pdir, "families.png"), {f: series[f]["cgl_vs_N"] for f in series}, pairs)
      pngs.append(("Families at matched N", f"{PLOTS_DIR}/families.png"))

  md = [f"# Scaling report: `{os.path.basename(run_dir)}`", "",
        f"{len(rows)} result rows, families: {', '.join(sorted(series))}. Chance CGL = {chance:.7f}. "
        f"Fits: `scipy.optimize.least_squares` ({cfg.loss} loss), {cfg.restarts} seeded restarts (seed "
        f"{cfg.seed}), best kept; " + (f"{_percent(cfg)} CIs from {cfg.bootstrap_resamples} query bootstrap "
                                      "resamples (per-cell means recomputed with shared query indices)."
                                      if cfg.bootstrap_resamples else "no CIs (bootstrap resamples 0)."), "",
        "## Fitted laws", "", *_fits_section(fitted, verdicts, cfg), "",
        f"Predictions are at {cfg.extrapolate:g}x the largest observed x (N for the joint law, at the largest D).",
        ""]
  for fam in series:
    bm = series[fam]["beam_model"]
    others = ", ".join(_fmt(n) for n in series[fam]["cgl_vs_D_other_n"])
    md.append(f"- {fam}: CGL vs N at D = {_fmt(series[fam]['cgl_vs_N'].fixed['D'])}; CGL vs D at N = "
              f"{_fmt(series[fam]['cgl_vs_D'].fixed['N'])}" + (f" (fitted; plotted also at N = {others})" if others
                                                              else "")
              + f"; beam series at N = {_fmt(bm['N'])}, D = {_fmt(bm['D'])}.")
  md += ["", "## Plots", ""]
  for title, rel in pngs:
    md += [f"### {title}", "", f"![{title}]({rel})", ""]
  if pairs:
    md += ["## Families at matched N", "",
           f"| A | N_A | CGL_A | B | N_B | CGL_B | A - B (paired {_percent(cfg)} CI) |",
           "|---|---|---|---|---|---|---|"]
    for p in pairs:
      md.append(f"| {p['family_a']} | {_fmt(p['n_a'])} | {_fmt(p['cgl_a'])} | {p['family_b']} | {_fmt(p['n_b'])} | "
                f"{_fmt(p['cgl_b'])} | {_diff(p['diff'], p['diff_ci'])} |")
    md.append("")
  if steps:
    md += ["## Paired differences along each axis", "",
           "CGL change from one model to the next within a family (negative: the second is better); CI from a "
           "bootstrap of the per-query differences (same queries and negatives in both).", "",
           f"| family | axis | at | from | to | CGL from | CGL to | change (paired {_percent(cfg)} CI) |",
           "|---|---|---|---|---|---|---|---|"]
    for s in steps:
      at = ", ".join(f"{k} = {_fmt(v)}" for k, v in s["fixed"].items())
      md.append(f"| {s['family']} | {s['axis']} | {at} | {_fmt(s['from'])} | {_fmt(s['to'])} | "
                f"{_fmt(s['cgl_from'])} | {_fmt(s['cgl_to'])} | {_diff(s['diff'], s['diff_ci'])} |")
    md.append("")
  md += ["## Results", "", *_results_table(rows), ""]
  md += ["## Notes", ""] + ([f"- {n}" for n in notes] or ["- none"]) + [""]
  out = os.path.join(run_dir, REPORT_MD)
  atomic_files.write_text(out, "\n".join(md))
  return out


def flops_coefficients(rows: Sequence[dict]) -> dict[str, float | None]:
  """Medians of train_flops / (N D) and decode_flops_per_query / (N beam), for `genret advise`."""
  tr = [r["train_flops"] / (r["n_nonembed"] * r["D"]) for r in rows
        if not math.isnan(r.get("train_flops", math.nan)) and r["train_flops"] > 0]
  de = [r["decode_flops_per_query"] / (r["n_nonembed"] * r["beam"]) for r in rows
        if not math.isnan(r.get("decode_flops_per_query", math.nan)) and r["decode_flops_per_query"] > 0]
  return {"train_flops_per_param_example": float(np.median(tr)) if tr else None,
          "decode_flops_per_param_beam": float(np.median(de)) if de else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_dir", help="sweep directory holding results.csv (and cells/<cell_id>/per_query.json)")
  parser.add_argument("--restarts", type=int, default=fits_lib.DEFAULT_RESTARTS, help="random restarts per fit")
  parser.add_argument("--seed", type=int, default=0, help="seed of restarts and bootstrap")
  parser.add_argument("--loss", default="linear", choices=fits_lib.LOSSES, help="least_squares loss")
  parser.add_argument("--f_scale", type=float, default=None, help="robust-loss scale in units of the metric")
  parser.add_argument("--bootstrap", type=int, default=1000, help="query bootstrap resamples (0: no CIs)")
  parser.add_argument("--resample_restarts", type=int, default=2,
                      help="random restarts per bootstrap refit (besides the warm start)")
  parser.add_argument("--resample_max_nfev", type=int, default=100,
                      help="evaluation cap of each bootstrap refit (warm-started at the point estimate)")
  parser.add_argument("--beam_metric", default="recall@10", help="retrieval metric whose error is fitted vs beam")
  parser.add_argument("--no_plots", action="store_true")


def run(args: argparse.Namespace) -> int:
  cfg = ReportConfig(restarts=args.restarts, seed=args.seed, loss=args.loss, f_scale=args.f_scale,
                     bootstrap_resamples=args.bootstrap, resample_restarts=args.resample_restarts,
                     resample_max_nfev=args.resample_max_nfev, beam_metric=args.beam_metric, plots=not args.no_plots)
  out = make_report(args.run_dir, cfg)
  print(json.dumps({"report": out, "fits": os.path.join(os.path.dirname(out), FITS_JSON)}))
  return 0
