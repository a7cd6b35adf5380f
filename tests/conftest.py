"""Shared test setup. 8 simulated CPU devices for the sharding tests: must be set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("GENRET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.exists():
    pytest.fail(f"shared data not found at {SHARED_DATA} (set GENRET_SHARED_DATA)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def cranfield_dir(shared_data) -> pathlib.Path:
  return shared_data / "cranfield"


@pytest.fixture(scope="session")
def scifact_dir(shared_data) -> pathlib.Path:
  return shared_data / "scifact"


def pytest_configure(config):
  # Identical computations recur across tests (same tiny models and shapes, new closures): a session-wide
  # persistent compilation cache turns those recompilations into cache hits.
  import tempfile
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="genret_jax_cache_"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="module", autouse=True)
def _fresh_gin_config():
  """Each test module starts from an empty gin config: with --dist loadfile one worker runs many modules, and a
  binding parsed by an earlier module (e.g. a model's z_loss) must not reach the next one's models."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()
