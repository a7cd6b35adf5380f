"""Keep XLA:CPU's per-execution temp buffer resident between calls (glibc malloc settings).

XLA:CPU allocates each compiled program's temporaries as one contiguous block per call (`preallocated-temp` in
the buffer assignment: 200 MB for the t5 r2 train step of `benchmarks/train_throughput.py`) from one of its worker
threads. glibc gives worker threads their own arenas, whose heaps cannot exceed 64 MB, so such a block is always a
fresh `mmap` that is `munmap`ed when the call returns: every call page-faults the whole block back in, zero-filled
by the kernel. On the 2-core CI machine that was ~50k page faults and ~230 ms of system time per 490 ms t5 r2
train step (with `configure()`: ~0 faults, ~10 ms, 430 ms per step; ad-hoc `perf stat` / `getrusage` over the
benchmark's train step, not a repo command; `tests/test_host_malloc.py` measures the faults on a small program).

`configure()` tells glibc to serve every thread from the main arena, to take blocks up to `mmap_threshold` from the
heap instead of `mmap`, and not to trim freed memory off the top of the heap (`trim_threshold` -1; a finite one,
even 1 GiB, still let the llama r2 step's 400 MB block be trimmed and faulted back in after heap fragmentation);
the temp block is then reused call after call. Costs: the heap keeps its high-water mark (the r2 train
benchmarks' peak RSS rose by 15-100%), and threads share one arena's lock (XLA and the input pipeline allocate
little outside these blocks). Blocks above `mmap_threshold` (1 GiB) are still mapped per call. Accelerator
backends are unaffected (their temporaries live in device memory).

Arena assignment happens at a thread's first allocation, so `configure()` must run before XLA's thread pool or any
other library thread starts: the `genret` console script calls it first thing, benchmarks call it before importing
jax / torch, and library users call it at the top of their program. `GENRET_HOST_MALLOC=default` leaves glibc's
defaults alone. A no-op (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

ENV_VAR = "GENRET_HOST_MALLOC"
_configured: dict[str, int] | None = None


def _glibc():
  name = ctypes.util.find_library("c") or "libc.so.6"
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    return libc
  except (OSError, AttributeError):
    return None


def configure(mmap_threshold: int = 1 << 30, trim_threshold: int = -1) -> bool:
  """Applies the settings above once per process. Returns True where they are in effect."""
  global _configured
  if _configured is not None:
    return bool(_configured)
  _configured = {}
  if os.environ.get(ENV_VAR, "").lower() in ("default", "0", "off"):
    return False
  libc = _glibc()
  if libc is None:
    return False
  settings = {"arena_max": (_M_ARENA_MAX, 1), "mmap_threshold": (_M_MMAP_THRESHOLD, mmap_threshold),
              "trim_threshold": (_M_TRIM_THRESHOLD, trim_threshold)}
  for key, (param, value) in settings.items():
    if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
      logging.warning("host_malloc: glibc refused mallopt(%s=%d); XLA:CPU temp buffers may be re-mapped per call",
                      key, value)
      continue
    _configured[key] = value
  return bool(_configured)


def settings() -> dict[str, int]:
  """The mallopt settings `configure()` applied in this process ({} when none)."""
  return dict(_configured or {})
