"""`genret_jax.host_malloc`: XLA:CPU's per-call temp block stays resident instead of being page-faulted back in."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

# A jitted function with one 64 MB temporary ([4096, 4096] f32); minor page faults per call, after warm-up.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    from genret_jax import host_malloc
    configured = host_malloc.configure()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x, w):
      return (jnp.tanh(x @ w) @ w.T).sum()

    x, w = jnp.ones((4096, 64)), jnp.full((64, 4096), 0.01)
    for _ in range(2):
      f(x, w).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      f(x, w).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    print(json.dumps({"configured": configured, "settings": host_malloc.settings(), "faults_per_call": faults}))
""")


def _probe(env_value: str | None) -> dict:
  import json
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("GENRET_HOST_MALLOC", None)
  if env_value is not None:
    env["GENRET_HOST_MALLOC"] = env_value
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings exist only in glibc (a no-op elsewhere, tested below)")
def test_temp_block_is_not_faulted_in_per_call():
  default = _probe("default")
  tuned = _probe(None)
  assert default["configured"] is False and default["settings"] == {}
  assert tuned["configured"] is True
  assert tuned["settings"] == {"arena_max": 1, "mmap_threshold": 1 << 30, "trim_threshold": -1}
  # glibc's defaults: the 64 MB block is a fresh mmap each call (16,384 4-KiB pages faulted in).
  assert default["faults_per_call"] > 8000, default
  assert tuned["faults_per_call"] < 0.05 * default["faults_per_call"], (tuned, default)


def test_configure_is_idempotent_and_opt_out(monkeypatch):
  from genret_jax import host_malloc
  monkeypatch.setattr(host_malloc, "_configured", None)
  monkeypatch.setenv("GENRET_HOST_MALLOC", "default")
  assert host_malloc.configure() is False
  assert host_malloc.settings() == {}
  monkeypatch.delenv("GENRET_HOST_MALLOC")
  assert host_malloc.configure() is False   # decided once per process
  monkeypatch.setattr(host_malloc, "_glibc", lambda: None)
  monkeypatch.setattr(host_malloc, "_configured", None)
  assert host_malloc.configure() is False   # not glibc: nothing to set
