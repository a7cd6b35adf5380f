"""`genret advise`: compute-optimal (N, D, beam) from a joint law under a FLOP budget."""

import json
import math

import numpy as np
import pytest

from genret_jax import cli
from genret_jax.errors import InputError
from genret_jax.scaling import advise
from genret_jax.scaling import fits

JOINT = fits.FitResult(form="joint", params=dict(A=16.0, alpha=1.6, beta=0.4, B=1.5e-3, delta=0.0033), r2=1.0,
                       cost=0.0, num_points=7)
BEAM = fits.FitResult(form="power", params=dict(a=0.3, b=0.5, c=0.1), r2=1.0, cost=0.0, num_points=4)


def _brute(budget, compute, beams, beam_fit=None, beam_ref=1):
  best = (math.inf, None)
  ref = beam_fit.predict([beam_ref])[0] if beam_fit else 1.0
  for beam in beams:
    for n in np.geomspace(1e5, 1e10, 4000):
      rem = budget - compute.inference_flops(n, beam)
      if rem <= 0:
        continue
      d = rem / compute.train_flops(n, 1.0)
      m = beam_fit.predict([beam])[0] / ref if beam_fit else 1.0
      v = JOINT.predict([[n, d]])[0] * m
      if v < best[0]:
        best = (v, (n, d, beam))
  return best


def test_advise_matches_brute_force_and_spends_budget():
  compute = advise.ComputeModel.linear(240.0, 24.0, num_queries=1e4)
  for budget in (1e14, 1e16):
    out = advise.advise(JOINT, budget, compute, beams=[1], n_range=(1e5, 1e10))
    best = out["best"]
    v, (n, _, _) = _brute(budget, compute, [1])
    assert best["score"] <= v * (1 + 1e-9)
    assert best["N"] == pytest.approx(n, rel=0.02)
    assert best["train_flops"] + best["inference_flops"] == pytest.approx(budget, rel=1e-9)
  # More compute buys a lower predicted loss and a larger model.
  small = advise.advise(JOINT, 1e14, compute, beams=[1], n_range=(1e5, 1e10))["best"]
  big = advise.advise(JOINT, 1e16, compute, beams=[1], n_range=(1e5, 1e10))["best"]
  assert big["score"] < small["score"] and big["N"] > small["N"]


def test_beam_tradeoff():
  compute = advise.ComputeModel.linear(240.0, 24.0, num_queries=1e4)
  beams = [1, 5, 10, 20, 50, 100]
  # Without a beam law a wider beam only costs FLOPs: the smallest beam wins.
  assert advise.advise(JOINT, 1e16, compute, beams=beams, n_range=(1e5, 1e10))["best"]["beam"] == 1
  out = advise.advise(JOINT, 1e16, compute, beams=beams, n_range=(1e5, 1e10), beam_fit=BEAM, beam_ref=1)
  v, (_, _, beam) = _brute(1e16, compute, beams, BEAM, 1)
  assert out["best"]["beam"] == beam > 1
  assert out["best"]["score"] <= v * (1 + 1e-9)
  assert len(out["per_beam"]) == len(beams)
  # When inference dominates (many queries), the beam shrinks.
  heavy = advise.ComputeModel.linear(240.0, 24.0, num_queries=1e9)
  out_heavy = advise.advise(JOINT, 1e16, heavy, beams=beams, n_range=(1e5, 1e10), beam_fit=BEAM, beam_ref=1)
  assert out_heavy["best"]["beam"] < out["best"]["beam"]
  with pytest.raises(InputError, match="budget"):
    advise.advise(JOINT, 1e3, heavy, beams=beams, n_range=(1e5, 1e10))


def test_advise_cli_from_fits_json(tmp_path, capsys):
  payload = {"flops": {"train_flops_per_param_example": 240.0, "decode_flops_per_param_beam": 24.0},
             "families": {"t5": {"beams": [1, 5, 10, 20], "range": {"N": [1e6, 2.56e8], "D": [5e3, 2e4]},
                                 "fits": {"joint": JOINT.to_dict(), "error_vs_beam": BEAM.to_dict()}},
                          "llama": {"beams": [1], "fits": {"joint": None}}}}
  path = tmp_path / "fits.json"
  path.write_text(json.dumps(payload))
  out_path = tmp_path / "advice.json"
  rc = cli.main(["advise", "--fit", str(path), "--budget", "1e16", "--queries", "1e4", "--output", str(out_path)])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out["best_family"] == "t5"
  assert out["families"]["t5"]["best"]["beam"] in (1, 5, 10, 20)
  assert "skipped" in out["families"]["llama"]
  assert json.loads(out_path.read_text()) == out
  assert cli.main(["advise", "--fit", str(path), "--budget", "1e16", "--queries", "1", "--family", "x"]) == 2
  assert "family" in capsys.readouterr().err
  # Options out of range are one error each (beam 0 was picked as "best" with a NaN score).
  for extra, key in ((["--beams", "0,5"], "beams"), (["--beams", "a,b"], "beams"), (["--max_examples", "0"],
                     "max_examples"), (["--n_min", "1e9", "--n_max", "1e6"], "n_min")):
    assert cli.main(["advise", "--fit", str(path), "--budget", "1e16", "--queries", "1e4", *extra]) == 2
    assert f"config key {key}:" in capsys.readouterr().err
  assert cli.main(["advise", "--fit", str(path), "--budget", "1e16", "--queries", "-5"]) == 2
  assert "config key queries: must be a positive number" in capsys.readouterr().err
