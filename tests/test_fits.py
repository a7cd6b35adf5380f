"""Scaling-law fits against the paper's own points (SLGR_BEHAVIOUR.md §8.1 / §8.2), seeding and bootstrap."""

import numpy as np
import pytest

from genret_jax.errors import InputError
from genret_jax.scaling import fits

T5_N = np.array([44_057_088, 198_229_248, 704_769_024, 2_818_699_264, 11_274_422_272], dtype=float)
T5_CGL = np.array([0.003739327519766013, 0.00365354820880983, 0.003618691318817766, 0.0035889147738936734,
                   0.003575122915571207])
LLAMA_N = np.array([6_607_343_616, 12_852_024_320, 68_714_504_192], dtype=float)
LLAMA_CGL = np.array([0.003349998694460214, 0.003293957555899526, 0.0032800482437811704])
LLAMA_D = np.array([117_760, 235_520, 353_280, 471_040, 588_800], dtype=float)
LLAMA_D_CGL = np.array([0.003413291978135587, 0.003353927870270544, 0.0033509868940814346,
                        0.0033502276147056305, 0.003349998694460214])


def test_minder_t5_points():
  f = fits.fit("power", T5_N, T5_CGL, seed=0)
  assert f.r2 > 0.99
  assert f.params["c"] == pytest.approx(0.00355557, abs=2e-7)  # §8.2: c = 0.00355557, R² = 0.99913
  assert f.params["a"] == pytest.approx(0.022494, rel=1e-3)
  assert f.params["b"] == pytest.approx(0.40215, rel=1e-3)
  assert f.r2 == pytest.approx(0.99913, abs=1e-5)
  # visual.py's t5-large value gives the paper's plotted curve (a = 0.005809, b = 0.37758, c = 0.00355245).
  v = T5_CGL.copy()
  v[2] = 0.003623691318817766
  fv = fits.fit("power", T5_N, v, seed=1)
  assert fv.params["c"] == pytest.approx(0.00355245, abs=2e-7)
  assert fv.r2 == pytest.approx(0.99650, abs=1e-5)


def test_llama_series():
  fd = fits.fit("power", LLAMA_D, LLAMA_D_CGL, seed=0)
  assert fd.params["c"] == pytest.approx(0.00335001, abs=2e-7)
  assert fd.params["b"] == pytest.approx(3.9953, rel=1e-3)
  assert fd.r2 == pytest.approx(0.99998, abs=1e-5)
  fn = fits.fit("power", LLAMA_N, LLAMA_CGL, seed=0)
  assert fn.params["c"] == pytest.approx(0.00327980, abs=2e-7)
  assert fn.dof == 0 and fn.r2 == pytest.approx(1.0, abs=1e-9)


def test_joint_fit_reproduces_delta():
  # fit_laws_minder.py: the 5 data points at N = 7B and the 3 model points at D = 588,800 (7B appears twice).
  x = np.array([[LLAMA_N[0], d] for d in LLAMA_D] + [[n, LLAMA_D[-1]] for n in LLAMA_N])
  y = np.concatenate([LLAMA_D_CGL, LLAMA_CGL])
  f = fits.fit("joint", x, y, seed=0, restarts=20)
  assert f.params["delta"] == pytest.approx(0.00327980, abs=2e-7)
  assert f.params["beta"] == pytest.approx(2.4101, rel=2e-3)
  assert f.params["alpha"] == pytest.approx(8.9127, rel=2e-3)
  assert f.r2 > 0.99999
  # Prediction at an unseen (N, D) is finite and below the smallest observed loss for a bigger model.
  pred = f.predict([[1.4e11, 588_800]])[0]
  assert LLAMA_CGL.min() > pred > f.params["delta"]


def test_seeding_makes_fits_identical_and_restart_selection():
  a = fits.fit("power", T5_N, T5_CGL, seed=5, restarts=10)
  b = fits.fit("power", T5_N, T5_CGL, seed=5, restarts=10)
  assert a.to_dict() == b.to_dict()
  back = fits.FitResult.from_dict(a.to_dict())
  np.testing.assert_array_equal(back.predict(T5_N), a.predict(T5_N))
  # Only random restarts from the reference ranges (no data-driven start) still find the optimum.
  c = fits.fit("power", T5_N, T5_CGL, seed=0, restarts=50, initial_params=[[1e3, 1.0, 0.0]])
  assert c.params["c"] == pytest.approx(0.00355557, abs=2e-7)


def test_huber_resists_an_outlier():
  x = np.geomspace(1e6, 1e9, 8)
  y = (1e-3 / x) ** 0.4 + 0.0033
  y_bad = y.copy()
  y_bad[3] += 3e-4
  # Least squares follows the outlier to a limit of the law (b -> 0, a underflowing to 0): refused.
  with pytest.raises(InputError, match="outside float64's range"):
    fits.fit("power", x, y_bad, seed=0, restarts=4)
  hub = fits.fit("power", x, y_bad, seed=0, restarts=4, loss="huber", f_scale=1e-6)
  assert hub.loss == "huber" and hub.f_scale == 1e-6
  assert hub.params["c"] == pytest.approx(0.0033, rel=0.01)
  assert hub.params["b"] == pytest.approx(0.4, rel=0.05)


def test_input_errors():
  with pytest.raises(InputError, match="> 0"):
    fits.fit("power", [0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
  with pytest.raises(InputError, match="unknown law"):
    fits.fit("cubic", [1.0, 2.0], [1.0, 2.0])
  with pytest.raises(InputError, match="rows"):
    fits.fit("joint", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])


def test_a_limit_of_the_law_is_refused_not_reported_with_nan():
  """CGL falling faster at large N (session 17's Cranfield CPU sweep, T5): no decreasing power law passes through
  it, the optimiser runs to b -> 0 where a underflows to 0, and the fit was reported as `(0 / x)^0.0022 - 0.011`
  with R² nan (every prediction nan)."""
  n = [1.299e5, 5.175e5, 1.969e6]
  with pytest.raises(InputError, match=r"a = 0 \(outside float64's range\)"):
    fits.fit("power", n, [0.003717, 0.003703, 0.003628])
  f = fits.fit("power", n, [0.003717, 0.003690, 0.003680])   # falling more slowly: a finite law, exact
  assert 0 < f.params["a"] < np.inf and f.r2 > 0.999999


def _cells(num_queries, seed):
  rng = np.random.default_rng(seed)
  x = np.geomspace(1e6, 3e8, 6)
  means = (2e-3 / x) ** 0.4 + 0.0033
  # Per-query values share a query effect across cells (as with shared queries and negatives).
  q_effect = 0.1 * rng.standard_normal(num_queries)
  cells = [m * (1 + q_effect + 0.05 * rng.standard_normal(num_queries)) for m in means]
  return x, cells


def test_bootstrap_ci_contains_estimate_and_shrinks():
  widths = []
  for q in (40, 640):
    x, cells = _cells(q, seed=0)
    f = fits.bootstrap_fit("power", x, cells, restarts=10, seed=0, num_resamples=200, resample_restarts=0,
                           predict_at=[3e9])
    for k in ("b", "c"):
      lo, hi = f.param_ci[k]
      assert lo <= f.params[k] <= hi, (q, k)
    pred = f.predictions[0]
    assert pred["ci"][0] <= pred["y"] <= pred["ci"][1]
    widths.append((f.param_ci["c"][1] - f.param_ci["c"][0], pred["ci"][1] - pred["ci"][0]))
    assert f.bootstrap_resamples == 200 and f.confidence == 0.95
  assert widths[1][0] < widths[0][0] / 2 and widths[1][1] < widths[0][1] / 2
  # Same seed, same intervals.
  x, cells = _cells(40, seed=0)
  a = fits.bootstrap_fit("power", x, cells, restarts=5, seed=3, num_resamples=50, resample_restarts=0)
  b = fits.bootstrap_fit("power", x, cells, restarts=5, seed=3, num_resamples=50, resample_restarts=0)
  assert a.param_ci == b.param_ci


def test_resampled_cell_means_do_not_depend_on_the_other_cells():
  """Draws for a cell are seeded by its length, not by the order lengths first appear in."""
  from genret_jax.scaling import bootstrap
  rng = np.random.default_rng(0)
  a, b, c = rng.random(10), rng.random(9), rng.random(11)
  alone = bootstrap.resampled_cell_means([a, b], 50, seed=4)
  assert np.array_equal(bootstrap.resampled_cell_means([b, a], 50, seed=4)[:, ::-1], alone)
  with_c = bootstrap.resampled_cell_means([b, c, a], 50, seed=4)
  assert np.array_equal(with_c[:, [2, 0]], alone)   # a and b draw the same with c (11 queries) listed first
  same_length = bootstrap.resampled_cell_means([a, a + 1.0], 50, seed=4)   # aligned cells share a draw
  np.testing.assert_allclose(same_length[:, 1] - same_length[:, 0], 1.0)
