"""benchmarks/read_profile.py reads a jax.profiler trace back into time per jax op name."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read_profile():
  spec = importlib.util.spec_from_file_location("read_profile", ROOT / "benchmarks" / "read_profile.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_time_goes_to_the_named_ops(tmp_path):
  read_profile = _read_profile()

  @jax.jit
  def program(x):
    def body(i, y):
      with jax.named_scope("heavy"):
        y = jnp.tanh(y @ x)
      with jax.named_scope("light"):
        return y + 1.0
    return jax.lax.fori_loop(0, 4, body, x)

  x = jnp.ones((512, 512), jnp.float32) / 512
  program(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    program(x).block_until_ready()
  times, counted = read_profile.op_times(read_profile._load(tmp_path))
  assert counted > 0
  heavy = sum(t for name, t in times.items() if "heavy" in name)
  light = sum(t for name, t in times.items() if "light" in name)
  assert heavy > 0 and heavy > light
  # The loop itself (a control-flow instruction spanning its body) is not counted on top of its ops.
  assert not any(name.endswith("/while") for name in times)
  assert read_profile.group("jit(search)/while/body/vmap(jit(_take))/gather", 1) == "while/body/gather"


def test_not_a_trace_directory(tmp_path):
  with pytest.raises(SystemExit, match="no \\*.xplane.pb"):
    _read_profile()._load(tmp_path)
