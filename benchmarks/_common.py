"""What the benchmark scripts share: the machine's name and the docs/benchmarks.md section writer.

Each script owns one "## <name>" section of docs/benchmarks.md. A CPU run replaces the section's body; a GPU run
(the lent GPU machine, seen rarely) writes a "### GPU: <card>" subsection inside it, and a later CPU run keeps
those subsections, so one machine's figures never erase another's.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time

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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text.rstrip() + "\n")
  os.replace(tmp, path)


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
