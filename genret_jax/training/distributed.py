"""Multi-host set-up: `jax.distributed.initialize` from flags or the environment (t5x flag names)."""

from __future__ import annotations

import argparse
import os

import jax

from genret_jax.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--coordinator_address", default=os.environ.get("GENRET_COORDINATOR_ADDRESS"),
                      help="host:port of process 0 (multi-host). Env: GENRET_COORDINATOR_ADDRESS.")
  parser.add_argument("--process_count", type=int, default=_env_int("GENRET_PROCESS_COUNT"),
                      help="Number of processes (hosts). Env: GENRET_PROCESS_COUNT.")
  parser.add_argument("--process_index", type=int, default=_env_int("GENRET_PROCESS_INDEX"),
                      help="This process's index. Env: GENRET_PROCESS_INDEX.")
  parser.add_argument("--multiprocess", action="store_true",
                      help="Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...).")


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v in (None, ""):
    return None
  try:
    return int(v)
  except ValueError:
    raise InputError(f"{name}={v!r} is not an integer", key=name) from None


def initialize(coordinator_address: str | None = None, process_count: int | None = None,
               process_index: int | None = None, auto: bool = False) -> bool:
  """Returns True when a multi-process runtime was started. On CPU, collectives go through gloo."""
  if not coordinator_address and not auto and (process_count is not None or process_index is not None):
    # Given alone they were ignored: every host trained on its own as process 0 of 1.
    raise InputError("--process_count / --process_index need --coordinator_address (or --multiprocess)",
                     key="--coordinator_address")
  if process_count is not None and (process_count < 1 or not 0 <= (process_index or 0) < process_count):
    raise InputError(f"--process_index {process_index} must lie in [0, --process_count {process_count})",
                     key="--process_index")
  if coordinator_address:
    # Touching jax.default_backend() would initialise the backend before distributed init; read the env instead.
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=process_count,
                               process_id=process_index)
    return True
  if auto:
    jax.distributed.initialize()
    return True
  return False


def initialize_from_args(args) -> bool:
  return initialize(args.coordinator_address, args.process_count, args.process_index, args.multiprocess)
