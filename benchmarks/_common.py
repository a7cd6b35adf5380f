"""What the benchmark scripts share: the machine's name and the docs/benchmarks.md section writer.

Each script owns one "## <name>" section of docs/benchmarks.md. A CPU run replaces the section's body; a GPU run
(the lent GPU machine, seen rarely) writes a "### GPU: <card>" subsection inside it, and a later CPU run keeps
those subsections, so one machine's figures never erase another's.
"""

from __future__ import annotations

import os
import platform
import re

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
