"""What the benchmark scripts share: the machine's name, round-robin timing (`interleaved`, `round_ratio`) and
the docs/benchmarks.md section writer.

Each script owns one "## <name>" section of docs/benchmarks.md. A CPU run replaces the section's body; a GPU run
(the lent GPU machine, seen rarely) writes a "### GPU: <card>" subsection inside it, and a later CPU run keeps
those subsections, so one machine's figures never erase another's.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from typing import Any, NamedTuple

GPU_PREFIX = "### GPU: "


# T5 shapes the decode and CGL benchmarks share (the issues' "tiny" and "~40M" sizes); tied embeddings, fp32.
T5_BENCH_SIZES = {
    "tiny": dict(vocab_size=512, d_model=128, num_heads=4, head_dim=32, d_ff=512, num_encoder_layers=2,
                 num_decoder_layers=2),
    "base45m": dict(vocab_size=8192, d_model=512, num_heads=8, head_dim=64, d_ff=1024, num_encoder_layers=6,
                    num_decoder_layers=6),
    "tiny_v8k": dict(vocab_size=8192, d_model=128, num_heads=4, head_dim=32, d_ff=512, num_encoder_layers=2,
                     num_decoder_layers=2),
}


# A LLaMA-like prefix-LM the size of `base45m` (40.5M params, untied embeddings) for the decode benchmark's
# decoder-only rows; fp32.
LLAMA_BENCH_SIZES = {
    "llama42m": dict(vocab_size=8192, d_model=512, num_layers=10, num_heads=8, num_kv_heads=8, d_ff=1408),
}


def python_command() -> str:
  """The interpreter as a doc's command line should name it: `.venv/bin/python` for the repository's venv, else the
  executable's name (e.g. `python3` on a lent GPU machine's bare image), so a recorded command says what ran."""
  exe = os.path.abspath(sys.executable)
  venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")
  return ".venv/bin/python" if exe.startswith(venv + os.sep) else os.path.basename(exe)


def bench_t5_config(size: str):
  """The `T5_BENCH_SIZES[size]` T5Config (tied embeddings, fp32 compute and params)."""
  from genret_jax.models.t5 import T5Config
  return T5Config(**T5_BENCH_SIZES[size], tie_word_embeddings=True, dtype="float32", param_dtype="float32")


def bench_config(size: str):
  """The config of a benchmark size: `bench_t5_config` for `T5_BENCH_SIZES`, a fp32 LlamaConfig for
  `LLAMA_BENCH_SIZES`."""
  if size in LLAMA_BENCH_SIZES:
    from genret_jax.models.llama import LlamaConfig
    return LlamaConfig(**LLAMA_BENCH_SIZES[size], dtype="float32", param_dtype="float32")
  return bench_t5_config(size)


def configure_host_malloc() -> str:
  """`genret_jax.host_malloc.configure()` as the `genret` command does, before jax / torch start threads; both
  sides of a comparison run in this one process, so both get the same malloc settings. Returns a line for the
  docs saying which settings were in effect (`GENRET_HOST_MALLOC=default` keeps glibc's defaults)."""
  from genret_jax import host_malloc
  if host_malloc.configure():
    kv = ", ".join(f"{k} {v}" for k, v in host_malloc.settings().items())
    return f"host malloc: `genret_jax.host_malloc` ({kv}), both sides"
  return "host malloc: the C library's defaults (`GENRET_HOST_MALLOC=default` or not glibc), both sides"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


# ---- the machine's fp32 matmul peak (the "% of peak" / MFU denominators) ----------------------------------------

def time_reps(fn, min_seconds: float) -> float:
  """Seconds per call of `fn` (already warm), over at least `min_seconds`."""
  reps, total = 1, 0.0
  while True:
    t0 = time.perf_counter()
    fn(reps)
    total = time.perf_counter() - t0
    if total >= min_seconds:
      return total / reps
    reps = max(reps * 2, int(reps * min_seconds / max(total, 1e-6)) + 1)


# ---- round-robin timing of methods compared in one run ----------------------------------------------------------

MAX_BLOCK_CALLS = 10
WARMUP_ROUNDS = 1


class Timed(NamedTuple):
  seconds: float                 # median seconds per call over the timed rounds
  result: Any
  steps: int
  round_seconds: list            # per timed round, the block's median call
  first_call_seconds: float      # compile + one call: on a GPU the compile can dominate a run's wall time


def interleaved(methods: dict, repeats: int, block_seconds: float) -> dict:
  """methods: name -> callable returning (result, steps). Warms each up (two calls), then times them round-robin in
  `repeats` blocks per method; returns name -> Timed.

  A block is consecutive calls of one method (as a batch eval job runs: one framework, call after call), as
  many as fit `block_seconds` (at least 1, at most MAX_BLOCK_CALLS); it reports its median call. A lone call
  timed right after the other framework's measures the hand-over as well: torch's OpenMP workers and
  XLA:CPU's pool each spin and sleep on the same 2 cores, and a 15 ms call read 13 ms back to back vs 19 ms
  alternated one by one in a session-8 probe. Blocks still alternate, so machine drift hits both sides.
  The first WARMUP_ROUNDS rounds are run and discarded: two warm-up calls were not enough for the first row of
  a fresh process (tiny trie beam 1 read 21.5 ms per call there and 14.2 ms in an identical second row, session
  10), which had made beam 1 the slowest-looking row of every table."""
  res, per_call, first = {}, {}, {}
  for name, fn in methods.items():
    t = time.perf_counter()
    fn()   # compiles
    first[name] = time.perf_counter() - t
    t = time.perf_counter()
    res[name] = fn()
    per_call[name] = time.perf_counter() - t
  times = {name: [] for name in methods}
  for rnd in range(WARMUP_ROUNDS + repeats):
    for name, fn in methods.items():
      calls = max(1, min(MAX_BLOCK_CALLS, int(block_seconds / max(per_call[name], 1e-6))))
      block = []
      for _ in range(calls):
        t = time.perf_counter()
        r = fn()
        block.append(time.perf_counter() - t)
        res[name] = r
      per_call[name] = statistics.median(block)
      if rnd >= WARMUP_ROUNDS:
        times[name].append(per_call[name])
  return {name: Timed(statistics.median(times[name]), *res[name], times[name], first[name]) for name in methods}


def round_ratio(r: dict, slow: str, fast: str) -> float:
  """Median over rounds of time[slow] / time[fast] (a speed-up of `fast` over `slow`), from `interleaved`'s
  per-round times. This machine switches for seconds at a time between a fast and a ~1.6x slower state (the same
  process CPU share, no steal time; session 10 probe), longer than a block: blocks of one round share a state
  more often than the medians of the two methods do, so per-round ratios are the steadier figure."""
  return statistics.median(s / f for s, f in zip(r[slow].round_seconds, r[fast].round_seconds))


def jax_matmul(n: int):
  """(jitted fp32 n x n matmul, its operand): the workload of `jax_matmul_peak`, also timed beside other methods
  (decode_throughput's per-row "% of peak")."""
  import jax
  import jax.numpy as jnp
  return jax.jit(lambda x: x @ x), jax.random.normal(jax.random.key(0), (n, n), jnp.float32)


def jax_matmul_peak(n: int) -> float:
  f, a = jax_matmul(n)
  f(a).block_until_ready()

  def run(reps):
    out = None
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()

  return 2 * n ** 3 / time_reps(run, 0.5)


def torch_matmul_peak(n: int, device: str) -> float:
  import torch
  a = torch.randn(n, n, dtype=torch.float32, device=device)
  a @ a

  def run(reps):
    for _ in range(reps):
      out = a @ a
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    del out

  return 2 * n ** 3 / time_reps(run, 0.5)


def _split(text: str, section: str) -> tuple[str, str | None, str]:
  """(before, body or None, after) of `section` (a "## ..." heading line) in `text`."""
  m = re.search(rf"^{re.escape(section)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  if not m:
    return text.rstrip() + "\n\n", None, ""
  return text[:m.start()], m.group(1), text[m.end():]


def _gpu_blocks(body: str) -> dict[str, str]:
  """The "### GPU: ..." subsections of a section body, heading -> block text (heading line included)."""
  out = {}
  for m in re.finditer(rf"^({re.escape(GPU_PREFIX)}[^\n]*)\n(.*?)(?=^### |^## |\Z)", body, re.S | re.M):
    out[m.group(1).strip()] = f"{m.group(1).strip()}\n{m.group(2).rstrip()}\n"
  return out


def demote_headings(block: str) -> str:
  """Every markdown heading one level deeper, so a whole-section block nests under a machine subsection."""
  return re.sub(r"^(#{2,5}) ", lambda m: "#" + m.group(1) + " ", block, flags=re.M)


def _replace_block(text: str, heading: str, block: str, level: str) -> str:
  """Replaces the block under `heading` (up to the next heading of the same or a higher level), else appends."""
  stop = "|".join(re.escape("#" * n + " ") for n in range(2, len(level) + 1))
  pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^(?:{stop})|\Z)", re.S | re.M)
  new = f"{heading}\n\n{block.strip()}\n\n"
  if pattern.search(text):
    return pattern.sub(lambda _: new, text, count=1)
  return text.rstrip() + "\n\n" + new


def _write(path: str, text: str) -> None:
  from genret_jax import atomic_files
  atomic_files.write_text(path, text.rstrip() + "\n")


def write_subsection(path: str, section: str, heading: str, body: str, intro: str = "") -> None:
  """Writes `body` as the `heading` ("### ...") subsection of `section` in the markdown file at `path`, replacing
  that subsection or appending it; the section's other text and the file's other sections are kept."""
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  before, old, after = _split(text, section)
  inner = _replace_block(old if old is not None else intro + "\n", heading, body, "###")
  _write(path, before + f"{section}\n\n{inner.strip()}\n\n" + after.lstrip())


def write_section(path: str, section: str, body: str, gpu_card: str | None = None) -> None:
  """Writes `body` into `section` of the markdown file at `path` (created if missing).

  gpu_card None (a CPU run): `body` replaces the section's body; its "### GPU: ..." subsections are kept after it.
  gpu_card set: `body` becomes (or replaces) the "### GPU: <gpu_card>" subsection; the rest stays.
  """
  if gpu_card is not None:
    write_subsection(path, section, GPU_PREFIX + gpu_card, body)
    return
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  before, old, after = _split(text, section)
  parts = [section, "", body.strip()]
  for block in _gpu_blocks(old or "").values():
    parts += ["", block.rstrip()]
  _write(path, before + "\n".join(parts).rstrip() + "\n\n" + after.lstrip())
