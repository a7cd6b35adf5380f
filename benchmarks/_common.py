"""What the benchmark scripts share: the machine's name and the docs/benchmarks.md section writer.

Each script owns one "## <name>" section of docs/benchmarks.md. A CPU run replaces the section's body; a GPU run
(the lent GPU machine, seen rarely) writes a "### GPU: <card>" subsection inside it, and a later CPU run keeps
those subsections, so one machine's figures never erase another's.
"""

from __future__ import annotations

import os
import platform
import re
import time

GPU_PREFIX = "### GPU: "


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


def jax_matmul_peak(n: int) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
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


def write_section(path: str, section: str, body: str, gpu_card: str | None = None) -> None:
  """Writes `body` into `section` of the markdown file at `path` (created if missing).

  gpu_card None (a CPU run): `body` replaces the section's body; its "### GPU: ..." subsections are kept after it.
  gpu_card set: `body` becomes (or replaces) the "### GPU: <gpu_card>" subsection; the rest stays.
  """
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  before, old, after = _split(text, section)
  old = old or ""
  gpus = _gpu_blocks(old)
  if gpu_card is None:
    main = body.strip()
  else:
    first = old.find(GPU_PREFIX)
    main = (old if first < 0 else old[:first]).strip()
    gpus[GPU_PREFIX + gpu_card] = f"{GPU_PREFIX}{gpu_card}\n\n{body.strip()}\n"
  parts = [section, "", main] if main else [section]
  for block in gpus.values():
    parts += ["", block.rstrip()]
  new = before + "\n".join(parts).rstrip() + "\n\n" + after.lstrip()
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(new.rstrip() + "\n")
  os.replace(tmp, path)
