"""Matplotlib (Agg) figures of a sweep: laws over N and D, beam / decode-FLOPs curves, family comparison.

Each function takes already-selected series (see `report.select_series`) and writes one PNG, whole or not at all
(`atomic_files`), to a local path or a URL (gs://).
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from genret_jax import atomic_files  # noqa: E402
from genret_jax.scaling import fits as fits_lib  # noqa: E402

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _color(i: int) -> str:
  return _COLORS[i % len(_COLORS)]


def _save(fig, path: str | os.PathLike) -> str:
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  atomic_files.write_bytes(path, png.getvalue())
  return os.fspath(path)


def _limit_y(ax, values) -> None:
  """Y limits from the measured values (points, their CIs, chance) only: a fitted curve drawn past the points
  can run to 1e10 (an unreliable fit with b = 50) and flatten every point onto one line."""
  v = np.asarray([x for x in np.ravel(values) if np.isfinite(x)], dtype=np.float64)
  if v.size == 0:
    return
  lo, hi = float(v.min()), float(v.max())
  pad = 0.15 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-12)
  ax.set_ylim(lo - pad, hi + pad)


def law_plot(path: str | os.PathLike, series_by_family: Mapping[str, "object"],
             fits_by_family: Mapping[str, fits_lib.FitResult | None], *, x_label: str, y_label: str = "CGL",
             title: str, chance: float | None = None,
             bands: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
             remarks: Mapping[str, str] | None = None) -> str:
  """Points per family on a log-x axis with the fitted curve (solid), its asymptote c (dashed) and an
  optional bootstrap band (x grid, lo, hi). A family's `remarks` entry (the report's "unreliable" or "trend only")
  is added to its curve's label, and an unreliable curve is drawn dotted: the plot is read apart from the table."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  measured = [] if chance is None else [chance]
  for i, (family, s) in enumerate(sorted(series_by_family.items())):
    color = _color(i)
    yerr = None
    measured += [*np.ravel(s.y), *([] if s.y_ci is None else np.ravel(s.y_ci))]
    if s.y_ci is not None:
      yerr = np.abs(np.stack([s.y - s.y_ci[:, 0], s.y_ci[:, 1] - s.y]))
    ax.errorbar(s.x, s.y, yerr=yerr, fmt="o", color=color, label=f"{family}", capsize=3)
    f = fits_by_family.get(family)
    if f is not None:
      lo, hi = float(np.min(s.x)), float(np.max(s.x))
      grid = np.geomspace(lo / 2.0, hi * 4.0, 200)
      remark = (remarks or {}).get(family, "")
      ax.plot(grid, f.predict(grid), ":" if remark == "unreliable" else "-", color=color, lw=1.5,
              label=f"{family} fit: {f.formula()} (R²={f.r2:.4f})" + (f", {remark}" if remark else ""))
      ax.axhline(f.params["c"], ls="--", color=color, lw=1.0, alpha=0.8, label=f"{family} asymptote c")
      if bands and family in bands:
        g, blo, bhi = bands[family]
        ax.fill_between(g, blo, bhi, color=color, alpha=0.15, lw=0)
  if chance is not None:
    ax.axhline(chance, ls=":", color="gray", lw=1.0, label=f"chance {chance:.6g}")
  _limit_y(ax, measured)
  ax.set_xscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6.5, loc="best")
  return _save(fig, path)


def beam_plot(path: str | os.PathLike, beam_rows_by_family: Mapping[str, Sequence[dict]],
              recall_keys: Sequence[str], error_fits: Mapping[str, fits_lib.FitResult | None],
              error_key: str, remarks: Mapping[str, str] | None = None) -> str:
  """2x2: Recall@k vs beam and vs decode FLOPs (top), CGL vs beam and vs decode FLOPs (bottom); `remarks` as in
  `law_plot`."""
  fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
  markers = ("o", "s", "^", "v", "D", "x")
  recalls: list[float] = []
  for i, (family, rows) in enumerate(sorted(beam_rows_by_family.items())):
    color = _color(i)
    beams = np.array([r["beam"] for r in rows], dtype=np.float64)
    flops = np.array([r["decode_flops_per_query"] for r in rows], dtype=np.float64)
    cgl = np.array([r["cgl"] for r in rows], dtype=np.float64)
    for j, key in enumerate(recall_keys):
      vals = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
      if np.all(np.isnan(vals)):
        continue
      recalls += list(vals)
      for col, xs in ((0, beams), (1, flops)):
        if col == 1 and np.all(np.isnan(xs)):
          continue
        axes[0, col].plot(xs, vals, marker=markers[j % len(markers)], color=color, lw=1,
                          label=f"{family} {key}")
    f = error_fits.get(family)
    if f is not None:
      grid = np.geomspace(beams.min(), beams.max() * 2.0, 100)
      remark = (remarks or {}).get(family, "")
      axes[0, 0].plot(grid, 1.0 - f.predict(grid), ":" if remark == "unreliable" else "--", color=color, lw=1,
                      label=f"{family} fit 1-{error_key}: {f.formula()}" + (f", {remark}" if remark else ""))
    axes[1, 0].plot(beams, cgl, "o-", color=color, label=family)
    if not np.all(np.isnan(flops)):
      axes[1, 1].plot(flops, cgl, "o-", color=color, label=family)
  for ax, (xl, yl) in zip(axes.flat, (("beam size", "Recall@k"), ("decode FLOPs per query", "Recall@k"),
                                      ("beam size", "CGL"), ("decode FLOPs per query", "CGL"))):
    ax.set_xscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=6.5, loc="best")
  for ax in axes[0]:
    _limit_y(ax, recalls + [0.0])
  axes[1, 0].set_title("CGL is teacher-forced: independent of beam", fontsize=9)
  return _save(fig, path)


def family_plot(path: str | os.PathLike, series_by_family: Mapping[str, "object"],
                pairs: Sequence[dict]) -> str:
  """CGL vs N of every family on one axis, matched-N pairs joined by grey lines."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, (family, s) in enumerate(sorted(series_by_family.items())):
    ax.plot(s.x, s.y, "o-", color=_color(i), label=family)
  for p in pairs:
    ax.plot([p["n_a"], p["n_b"]], [p["cgl_a"], p["cgl_b"]], "-", color="gray", alpha=0.6, lw=2)
  ax.set_xscale("log")
  ax.set_xlabel("non-embedding parameters N")
  ax.set_ylabel("CGL")
  ax.set_title("Families at matched N (grey: pairs within 2x in N)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)
