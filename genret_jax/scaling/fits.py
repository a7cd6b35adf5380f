"""Scaling-law fits with seeded restarts, R² and query-bootstrap confidence intervals.

Forms (SLGR_BEHAVIOUR.md §8):
  PowerLaw:  L(x)    = (a / x)^b + c                        x = N, D, beam or FLOPs
  JointLaw:  L(N, D) = ((A / D)^(alpha/beta) + B / N)^beta + delta

Like the reference, the fit is `scipy.optimize.least_squares` (TRF) on residuals pred - y with random
restarts drawn uniformly from the reference's init ranges (in original units), keeping the best. Unlike it,
everything is float64, the restarts are seeded, the best restart is kept (not the last), and the optimiser
works in a normalised parameterisation — x is divided by its median and taken in logs, y is centred and
scaled by its standard deviation, and the amplitude is carried as a log — so that parameters of wildly
different magnitudes (a ~ 1e-2, c ~ 3.5e-3, B ~ 1e8) are equally well conditioned. Parameters are always
reported in original units. With `loss="huber"` the residuals beyond `f_scale` (in units of y) count
linearly; the restart with the lowest value of the minimised objective is kept, which for plain least
squares is exactly the one with the highest R² (the reference's rule).

Confidence intervals resample QUERIES: each cell holds its per-query values, one bootstrap resample draws
query indices once (shared by all cells evaluated on the same queries), recomputes every cell's mean, and
refits (warm-started from the point estimate plus a few seeded random restarts).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np
from scipy import optimize

from genret_jax import atomic_files
from genret_jax.errors import InputError
from genret_jax.scaling import bootstrap

DEFAULT_RESTARTS = 50
LOSSES = ("linear", "huber", "soft_l1", "cauchy")


@dataclasses.dataclass(frozen=True)
class _Scale:
  """Normalisation constants: x medians (per input column), y shift and scale."""

  log_x_med: np.ndarray
  y_shift: float
  y_scale: float


class LawForm:
  """A scaling-law form: prediction in original units and the normalised parameterisation used to fit."""

  name: str
  param_names: tuple[str, ...]
  init_low: np.ndarray
  init_high: np.ndarray
  num_inputs: int
  amplitudes: tuple[str, ...] = ()   # parameters that must be > 0 (fitted as logs: they can underflow to 0)

  def predict(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def to_internal(self, params: np.ndarray, s: _Scale) -> np.ndarray:
    raise NotImplementedError

  def from_internal(self, theta: np.ndarray, s: _Scale) -> np.ndarray:
    raise NotImplementedError

  def predict_internal(self, theta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Normalised prediction (y - shift) / scale from t = log(x / x_med)."""
    raise NotImplementedError

  def jacobian_internal(self, theta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[num_points, num_params] derivative of `predict_internal` (analytic: faster, steadier restarts)."""
    raise NotImplementedError

  def data_starts(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Deterministic starting points guessed from the data (original units), tried before the random ones."""
    return []

  def formula(self, params: dict[str, float]) -> str:
    raise NotImplementedError


class PowerLaw(LawForm):
  """L(x) = (a / x)^b + c. Internally y_n = exp(k - b t) + c_n with t = log(x / x_med)."""

  name = "power"
  param_names = ("a", "b", "c")
  amplitudes = ("a",)
  init_low = np.array([1.0, 0.1, -1.0])
  init_high = np.array([1e4, 2.0, 1.0])
  num_inputs = 1

  def predict(self, params, x):
    a, b, c = (float(v) for v in params)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    with np.errstate(all="ignore"):
      return np.exp(b * (math.log(a) - np.log(x))) + c if a > 0 else np.full(x.shape, np.nan)

  def to_internal(self, params, s):
    a, b, c = (float(v) for v in params)
    k = b * (math.log(a) - s.log_x_med[0]) - math.log(s.y_scale)
    return np.array([k, b, (c - s.y_shift) / s.y_scale])

  def from_internal(self, theta, s):
    k, b, c_n = (float(v) for v in theta)
    with np.errstate(all="ignore"):
      log_a = (k + math.log(s.y_scale)) / b + s.log_x_med[0] if b != 0 else math.inf
      a = math.exp(log_a) if log_a < 700 else math.inf
    return np.array([a, b, c_n * s.y_scale + s.y_shift])

  def predict_internal(self, theta, t):
    k, b, c_n = theta
    return np.exp(np.clip(k - b * t[:, 0], -700, 700)) + c_n

  def jacobian_internal(self, theta, t):
    k, b, _ = theta
    e = np.exp(np.clip(k - b * t[:, 0], -700, 700))
    return np.stack([e, -t[:, 0] * e, np.ones_like(e)], axis=1)

  def data_starts(self, x, y):
    return [p for p in [_loglinear_guess(x[:, 0], y)] if p is not None]

  def formula(self, p):
    return f"L(x) = ({p['a']:.6g} / x)^{p['b']:.6g} + {p['c']:.6g}"


class JointLaw(LawForm):
  """L(N, D) = ((A / D)^(alpha/beta) + B / N)^beta + delta; x columns are (N, D).

  Internally y_n = exp(beta * logaddexp(q1 - g d, q2 - n)) + delta_n with g = alpha / beta,
  n = log(N / N_med), d = log(D / D_med).
  """

  name = "joint"
  param_names = ("A", "alpha", "beta", "B", "delta")
  amplitudes = ("A", "B")
  init_low = np.array([1.0, 0.1, 0.1, 1.0, -1.0])
  init_high = np.array([1e4, 2.0, 2.0, 1e4, 1.0])
  num_inputs = 2

  def predict(self, params, x):
    big_a, alpha, beta, big_b, delta = (float(v) for v in params)
    x = np.asarray(x, dtype=np.float64).reshape(-1, 2)
    n, d = x[:, 0], x[:, 1]
    with np.errstate(all="ignore"):
      return ((big_a / d) ** (alpha / beta) + big_b / n) ** beta + delta

  def to_internal(self, params, s):
    big_a, alpha, beta, big_b, delta = (float(v) for v in params)
    g = alpha / beta
    ls = math.log(s.y_scale) / beta
    q1 = g * (math.log(big_a) - s.log_x_med[1]) - ls
    q2 = math.log(big_b) - s.log_x_med[0] - ls
    return np.array([q1, g, q2, beta, (delta - s.y_shift) / s.y_scale])

  def from_internal(self, theta, s):
    q1, g, q2, beta, delta_n = (float(v) for v in theta)
    with np.errstate(all="ignore"):
      ls = math.log(s.y_scale) / beta if beta != 0 else math.inf
      log_a = (q1 + ls) / g + s.log_x_med[1] if g != 0 else math.inf
      log_b = q2 + ls + s.log_x_med[0]
    big_a = math.exp(log_a) if log_a < 700 else math.inf
    big_b = math.exp(log_b) if log_b < 700 else math.inf
    return np.array([big_a, g * beta, beta, big_b, delta_n * s.y_scale + s.y_shift])

  def predict_internal(self, theta, t):
    q1, g, q2, beta, delta_n = theta
    inner = np.logaddexp(q1 - g * t[:, 1], q2 - t[:, 0])
    return np.exp(np.clip(beta * inner, -700, 700)) + delta_n

  def jacobian_internal(self, theta, t):
    q1, g, q2, beta, _ = theta
    u1, u2 = q1 - g * t[:, 1], q2 - t[:, 0]
    inner = np.logaddexp(u1, u2)
    e = np.exp(np.clip(beta * inner, -700, 700))
    w1, w2 = np.exp(u1 - inner), np.exp(u2 - inner)
    return np.stack([beta * e * w1, -t[:, 1] * beta * e * w1, beta * e * w2, inner * e, np.ones_like(e)], axis=1)

  def data_starts(self, x, y):
    # From one-variable guesses: at the largest D the law is ~ (B/N)^beta + delta; along D at the N with
    # the most D values it is ~ (A/D)^alpha + const when the data term dominates.
    n, d = x[:, 0], x[:, 1]
    at_dmax = d == d.max()
    g_n = _loglinear_guess(n[at_dmax], y[at_dmax]) if len(set(n[at_dmax])) >= 3 else None
    counts = {v: int(np.sum(n == v)) for v in set(n)}
    n_star = max(counts, key=lambda v: (counts[v], v))
    at_n = n == n_star
    g_d = _loglinear_guess(d[at_n], y[at_n]) if len(set(d[at_n])) >= 3 else None
    if g_n is None:
      return []
    a_n, b_n, c_n = g_n
    starts = []
    for a_d, b_d in ([(g_d[0], g_d[1])] if g_d is not None else []) + [(float(np.median(d)), 2.0 * b_n)]:
      starts.append(np.array([a_d, b_d, b_n, a_n, c_n]))
    return starts

  def formula(self, p):
    return (f"L(N, D) = (({p['A']:.6g} / D)^({p['alpha']:.6g}/{p['beta']:.6g}) + {p['B']:.6g} / N)"
            f"^{p['beta']:.6g} + {p['delta']:.6g}")


FORMS: dict[str, LawForm] = {"power": PowerLaw(), "joint": JointLaw()}


def get_form(form: str | LawForm) -> LawForm:
  if isinstance(form, LawForm):
    return form
  if form not in FORMS:
    raise InputError(f"unknown law form {form!r}; choose from {sorted(FORMS)}", key="form")
  return FORMS[form]


@dataclasses.dataclass
class FitResult:
  """A fitted law in original units, optionally with bootstrap confidence intervals."""

  form: str
  params: dict[str, float]
  r2: float
  cost: float
  num_points: int
  loss: str = "linear"
  f_scale: float | None = None
  seed: int = 0
  restarts: int = DEFAULT_RESTARTS
  restarts_succeeded: int = 0
  x_name: str = "x"
  y_name: str = "y"
  # Filled by bootstrap_fit:
  param_ci: dict[str, list[float]] | None = None
  confidence: float | None = None
  bootstrap_resamples: int = 0
  bootstrap_failed: int = 0
  predictions: list[dict[str, Any]] | None = None  # [{"x": ..., "y": ..., "ci": [lo, hi]}]

  @property
  def law(self) -> LawForm:
    return get_form(self.form)

  @property
  def param_vector(self) -> np.ndarray:
    return np.array([self.params[k] for k in self.law.param_names], dtype=np.float64)

  @property
  def dof(self) -> int:
    """Residual degrees of freedom; <= 0 means the curve passes through the points by construction."""
    return self.num_points - len(self.law.param_names)

  def predict(self, x) -> np.ndarray:
    """Prediction at (possibly unseen) x: 1-D x for a power law, rows (N, D) for the joint law."""
    return self.law.predict(self.param_vector, _as_inputs(x, self.law))

  def formula(self) -> str:
    return self.law.formula(self.params)

  def to_dict(self) -> dict:
    return _jsonable(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, d: dict) -> "FitResult":
    known = {f.name for f in dataclasses.fields(cls)}
    missing = {"form", "params", "r2", "cost", "num_points"} - set(d)
    if missing:
      raise InputError(f"fit is missing {sorted(missing)}", key="fit")
    return cls(**{k: v for k, v in d.items() if k in known})

  def save(self, path: str | os.PathLike) -> None:
    atomic_files.write_json(path, self.to_dict(), indent=2)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {k: _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    v = float(obj)
    return v if math.isfinite(v) else None if math.isnan(v) else ("inf" if v > 0 else "-inf")
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _as_inputs(x, law: LawForm) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if law.num_inputs == 1:
    x = x.reshape(-1, 1)
  else:
    x = np.atleast_2d(x)
    if x.shape[1] != law.num_inputs:
      raise InputError(f"{law.name} law needs x rows of {law.num_inputs} values (N, D), got shape {x.shape}",
                       key="x")
  return x


def _loglinear_guess(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
  """(a, b, c) of (a/x)^b + c from a scan over c below min(y) with a log-log line fit for each."""
  x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
  if x.size < 3 or np.ptp(y) <= 0 or np.ptp(np.log(x)) <= 0:
    return None
  span = float(np.ptp(y))
  best, best_err = None, math.inf
  # y may rise with x (b < 0) as well as fall; scan c on the low side in both cases.
  for frac in (1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
    c = float(y.min()) - frac * span
    lx, ly = np.log(x), np.log(y - c)
    slope, icpt = np.polyfit(lx, ly, 1)
    err = float(np.sum((np.exp(icpt + slope * lx) + c - y) ** 2))
    b = -slope
    if err < best_err and b != 0 and np.isfinite(icpt):
      best, best_err = np.array([math.exp(icpt / b) if abs(icpt / b) < 700 else math.inf, b, c]), err
  return best if best is not None and np.all(np.isfinite(best)) else None


def _scale_for(x: np.ndarray, y: np.ndarray) -> _Scale:
  log_x_med = np.log(np.median(x, axis=0))
  y_scale = float(np.std(y))
  if not y_scale > 0:
    y_scale = abs(float(np.mean(y))) or 1.0
  return _Scale(log_x_med, float(np.mean(y)), y_scale)


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
  """1 - SS_res / SS_tot (the reference's selection criterion); NaN if y is constant."""
  y = np.asarray(y, dtype=np.float64)
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  ss_res = float(np.sum((y - pred) ** 2))
  return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def fit(form: str | LawForm, x, y, *, restarts: int = DEFAULT_RESTARTS, seed: int = 0, loss: str = "linear",
        f_scale: float | None = None, initial_params: Sequence[Sequence[float]] = (),
        init_low: Sequence[float] | None = None, init_high: Sequence[float] | None = None,
        x_name: str = "x", y_name: str = "y", max_nfev: int | None = None) -> FitResult:
  """Least-squares (or robust) fit with seeded random restarts; returns the best restart.

  Args:
    form: "power" or "joint" (or a LawForm).
    x: 1-D x for a power law; [num_points, 2] rows (N, D) for the joint law. Must be > 0.
    y: observed values (e.g. per-cell mean CGL).
    restarts: random starting points drawn uniformly in [init_low, init_high] (original units; default the
      reference's ranges), from `np.random.default_rng(seed)`. Unless `initial_params` is given, a few
      deterministic data-driven starts (a c-scan with log-log line fits) are tried first, because the
      reference's ranges suit its own data (N ~ 1e8..1e11) and not, e.g., a CPU ladder.
    loss: "linear" (least squares, the reference) or "huber" (or another `least_squares` robust loss).
    f_scale: robust-loss scale in units of y (default: 0.1 x std(y)); ignored for "linear".
    initial_params: extra starting points tried before the random ones (e.g. a warm start).
  """
  law = get_form(form)
  if loss not in LOSSES:
    raise InputError(f"loss must be one of {LOSSES}, got {loss!r}", key="loss")
  xs = _as_inputs(x, law)
  ys = np.asarray(y, dtype=np.float64).reshape(-1)
  if xs.shape[0] != ys.size:
    raise InputError(f"{xs.shape[0]} x values for {ys.size} y values", key="y")
  if ys.size < 2:
    raise InputError(f"need at least 2 points to fit, got {ys.size}", key="y")
  if not (np.all(np.isfinite(xs)) and np.all(xs > 0)):
    raise InputError("x values must be finite and > 0", key="x")
  if not np.all(np.isfinite(ys)):
    raise InputError("y values must be finite", key="y")
  s = _scale_for(xs, ys)
  t = np.log(xs) - s.log_x_med
  y_n = (ys - s.y_shift) / s.y_scale
  if f_scale is None:
    f_scale = 0.1 * float(np.std(ys)) if np.std(ys) > 0 else 1.0
  f_scale_n = float(f_scale) / s.y_scale

  def residual(theta):
    return law.predict_internal(theta, t) - y_n

  def jacobian(theta):
    return law.jacobian_internal(theta, t)

  low = np.asarray(law.init_low if init_low is None else init_low, dtype=np.float64)
  high = np.asarray(law.init_high if init_high is None else init_high, dtype=np.float64)
  rng = np.random.default_rng(int(seed))
  starts = [np.asarray(p, dtype=np.float64) for p in initial_params]
  if not initial_params:
    starts += law.data_starts(xs, ys)
  starts += [rng.uniform(low, high) for _ in range(int(restarts))]
  best_theta, best_cost, succeeded = None, math.inf, 0
  for p0 in starts:
    with np.errstate(all="ignore"):
      try:
        theta0 = law.to_internal(p0, s)
        if not np.all(np.isfinite(theta0)) or not np.all(np.isfinite(residual(theta0))):
          continue
        res = optimize.least_squares(residual, theta0, jac=jacobian, method="trf", loss=loss, f_scale=f_scale_n,
                                     x_scale="jac", max_nfev=max_nfev)
      except (ValueError, ZeroDivisionError, OverflowError, np.linalg.LinAlgError):
        continue
    if not np.all(np.isfinite(res.fun)):
      continue
    succeeded += 1
    if res.cost < best_cost:
      best_theta, best_cost = res.x, float(res.cost)
  if best_theta is None:
    raise InputError(f"all {len(starts)} restarts of the {law.name} fit failed", key="fit")
  params = law.from_internal(best_theta, s)
  # The optimiser can run along a valley to a limit the law only approaches, e.g. b -> 0 with log a -> -inf
  # (y falling linearly in log x, or faster at large x): a underflows to 0 and every prediction is nan.
  off = [f"{k} = {v:g}" for k, v in zip(law.param_names, params)
         if not math.isfinite(v) or (k in law.amplitudes and v <= 0)]
  if off:
    raise InputError(f"the best {law.name} fit has {', '.join(off)} (outside float64's range): these points follow "
                     "a limit of the law (e.g. exponent -> 0), not a law with finite parameters", key="fit")
  pred = law.predict(params, xs)
  # Report the objective in original units: SS_res / 2 for least squares.
  cost = best_cost * s.y_scale ** 2
  return FitResult(form=law.name, params=dict(zip(law.param_names, (float(v) for v in params))),
                   r2=r_squared(ys, pred), cost=cost, num_points=int(ys.size), loss=loss,
                   f_scale=float(f_scale) if loss != "linear" else None, seed=int(seed),
                   restarts=int(restarts), restarts_succeeded=succeeded, x_name=x_name, y_name=y_name)


def bootstrap_fit(form: str | LawForm, x, cells: Sequence[np.ndarray], *, restarts: int = DEFAULT_RESTARTS,
                  seed: int = 0, loss: str = "linear", f_scale: float | None = None,
                  num_resamples: int = 1000, resample_restarts: int = 2, resample_max_nfev: int = 200,
                  confidence: float = bootstrap.DEFAULT_CONFIDENCE, predict_at=None,
                  x_name: str = "x", y_name: str = "y") -> FitResult:
  """Point fit on the per-cell means plus percentile CIs of parameters and predictions over query resamples.

  Args:
    x: per cell, its x (power law) or (N, D) (joint law).
    cells: per cell, its per-query values (the cell's y is their mean). Cells with equal query counts are
      resampled with shared query indices (see `bootstrap.resampled_cell_means`).
    num_resamples: bootstrap resamples; each refit starts from the point estimate plus `resample_restarts`
      seeded random restarts.
    predict_at: x values (unseen allowed) at which predictions and their CIs are reported.
    resample_max_nfev: evaluation cap of each bootstrap refit (they start next to the optimum; the cap only
      bites along the flat directions of poorly identified parameters, e.g. `a` when b is small).
  """
  law = get_form(form)
  cells = [np.asarray(c, dtype=np.float64).reshape(-1) for c in cells]
  y = np.array([c.mean() for c in cells])
  point = fit(law, x, y, restarts=restarts, seed=seed, loss=loss, f_scale=f_scale, x_name=x_name, y_name=y_name)
  means = bootstrap.resampled_cell_means(cells, num_resamples, seed)
  at = None if predict_at is None else _as_inputs(predict_at, law)
  samples = np.full((num_resamples, len(law.param_names)), np.nan)
  preds = None if at is None else np.full((num_resamples, at.shape[0]), np.nan)
  failed = 0
  for r in range(num_resamples):
    try:
      fr = fit(law, x, means[r], restarts=resample_restarts, seed=seed + 1 + r, loss=loss, f_scale=point.f_scale,
               initial_params=[point.param_vector], max_nfev=resample_max_nfev)
    except InputError:
      failed += 1
      continue
    samples[r] = fr.param_vector
    if at is not None:
      preds[r] = law.predict(fr.param_vector, at)
  lo, hi = bootstrap.percentile_interval(samples, confidence)
  point.param_ci = {k: [float(l), float(h)] for k, l, h in zip(law.param_names, lo, hi)}
  point.confidence = confidence
  point.bootstrap_resamples = int(num_resamples)
  point.bootstrap_failed = failed
  if at is not None:
    plo, phi = bootstrap.percentile_interval(preds, confidence)
    yhat = law.predict(point.param_vector, at)
    point.predictions = [{"x": (row[0] if law.num_inputs == 1 else row.tolist()), "y": float(v),
                          "ci": [float(l), float(h)]} for row, v, l, h in zip(at, yhat, plo, phi)]
  return point


def prediction_band(fit_result: FitResult, x, cells: Sequence[np.ndarray], cell_x, *, num_resamples: int = 200,
                    seed: int = 0, confidence: float = bootstrap.DEFAULT_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
  """Pointwise CI band of a fitted law's prediction over a grid x (for plots), by query bootstrap."""
  law = fit_result.law
  at = _as_inputs(x, law)
  means = bootstrap.resampled_cell_means([np.asarray(c, dtype=np.float64) for c in cells], num_resamples, seed)
  preds = np.full((num_resamples, at.shape[0]), np.nan)
  for r in range(num_resamples):
    try:
      fr = fit(law, cell_x, means[r], restarts=0, seed=seed + 1 + r, loss=fit_result.loss,
               f_scale=fit_result.f_scale, initial_params=[fit_result.param_vector], max_nfev=200)
    except InputError:
      continue
    preds[r] = law.predict(fr.param_vector, at)
  return bootstrap.percentile_interval(preds, confidence)
