"""The embedded default corpus: Python standard-library docstrings as a known-item retrieval task.

What it is (so nobody mistakes it for a benchmark): 1,066 public functions, classes and methods of CPython
3.11's pure-Python standard library. A document is a docstring body (title = qualified name such as
`shutil.rmtree`), its query is the docstring's summary paragraph, removed from the document, and each query
has exactly one relevant document (grade 1). Splits train 853 / validation 107 / test 106, seeded (seed 0).
The snapshot in `genret_jax/data/pydoc_known_item/` (BEIR layout + meta.json) was generated once by
`python -m genret_jax.corpora.make_default_corpus`, so it is identical on every Python version; it needs no
download, which is why `make demo` uses it. Licence: the Python Software Foundation License.
"""

from __future__ import annotations

import json
import os
from typing import Any

from genret_jax.corpora import beir
from genret_jax.corpora.types import Collection

NAME = "pydoc_known_item"
SNAPSHOT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", NAME)


def snapshot_dir() -> str:
  return SNAPSHOT_DIR


def metadata() -> dict[str, Any]:
  """The generator's record: Python version, seed, filters, counts of what was dropped, module list."""
  with open(os.path.join(SNAPSHOT_DIR, "meta.json"), encoding="utf-8") as f:
    return json.load(f)


def load_default(*, normalize: bool = False, max_docs: int | None = None, name: str | None = None) -> Collection:
  """Reads the packaged snapshot (deterministic: the same documents, queries and splits on every machine)."""
  return beir.read_beir(SNAPSHOT_DIR, name=name or NAME, normalize=normalize, max_docs=max_docs)
