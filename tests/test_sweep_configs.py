"""Every shipped sweep config parses and plans; the demo's plan has the shape the main job promises."""

import glob
import os

import pytest

from genret_jax import gin_utils
from genret_jax.scaling import sweep as sweep_lib

SWEEPS = sorted(glob.glob(os.path.join(gin_utils.PACKAGE_GIN_DIR, "sweeps", "*.gin")))


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_sweep_config_plans(path):
  gin_utils.parse_gin([path], [])
  cfg = sweep_lib.SweepConfig()
  cells = sweep_lib.plan(cfg)
  assert cells and len({c["model_id"] for c in cells}) == len(cells)
  for c in cells:
    assert c["beams"] and os.path.exists(os.path.join(gin_utils.PACKAGE_GIN_DIR, c["rung"]))


def test_demo_plan_shape():
  gin_utils.parse_gin(["sweeps/demo.gin"], [])
  cfg = sweep_lib.SweepConfig()
  cells = sweep_lib.plan(cfg)
  families = {c["family"] for c in cells}
  assert families == {"t5", "llama"}
  for fam in families:
    assert len({c["rung"] for c in cells if c["family"] == fam}) >= 4
  assert len({c["fraction"] for c in cells}) >= 3
  beams = {b for c in cells for b in c["beams"]}
  assert min(beams) == 1 and max(beams) >= 20
