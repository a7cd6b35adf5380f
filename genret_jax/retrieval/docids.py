"""Identifier schemes with a lookup table (atomic, naive, semantic, codebook, title): decoded identifiers ->
documents.

The beam search returns, per query, its finished hypotheses best first. Each hypothesis is looked up in the
scheme's identifier table; documents are listed in the order they are first hit, each once, with the score of
the hypothesis that first hit it. An identifier shared by several documents (e.g. two documents with the same
title) yields all of them, in document-index order. Hypotheses that are not identifiers of any document (possible
only without a trie constraint) are counted, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from genret_jax.errors import InputError


@dataclasses.dataclass
class DocRanking:
  """Documents for one query, best first.

  Attributes:
    doc_indices: [n] int64 canonical document indices, no duplicates.
    scores: [n] float64 score of the hypothesis that first hit each document.
    ranks: [n] int64 rank (0-based, in the given hypothesis order) of that hypothesis.
    num_invalid: hypotheses that are no document's identifier.
    num_duplicates: hits on a document already listed.
  """

  doc_indices: np.ndarray
  scores: np.ndarray
  ranks: np.ndarray
  num_invalid: int = 0
  num_duplicates: int = 0


def _strip_tail(tokens: Sequence[int], strip: frozenset[int]) -> tuple[int, ...]:
  toks = [int(t) for t in (tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)]
  j = len(toks)
  while j > 0 and toks[j - 1] in strip:
    j -= 1
  return tuple(toks[:j])


class DocidLookup:
  """Identifier token sequence -> document indices.

  Trailing tokens in `strip_ids` (EOS, padding) are removed from both the table and the hypotheses, so a trie
  that ends identifiers with EOS and a table without it agree.
  """

  def __init__(self, pairs: Iterable[tuple[int, Sequence[int]]], strip_ids: Iterable[int] = ()):
    """Builds the table.

    Args:
      pairs: (document index, identifier token ids); a document may have several identifiers and an identifier
        may belong to several documents.
      strip_ids: token ids removed from the end of every identifier and hypothesis (EOS, pad).
    """
    self.strip_ids = frozenset(int(t) for t in strip_ids)
    table: dict[tuple[int, ...], list[int]] = {}
    for doc, ident in pairs:
      key = _strip_tail(ident, self.strip_ids)
      if not key:
        raise InputError(f"document {doc} has an empty identifier", key="identifiers")
      docs = table.setdefault(key, [])
      if int(doc) not in docs:
        docs.append(int(doc))
    self._table = {k: tuple(sorted(v)) for k, v in table.items()}

  @classmethod
  def from_identifiers(cls, identifiers: Sequence[Sequence[int]], strip_ids: Iterable[int] = ()) -> DocidLookup:
    """One identifier per document, in canonical document order."""
    return cls(enumerate(identifiers), strip_ids)

  def __len__(self) -> int:
    return len(self._table)

  def lookup(self, identifier: Sequence[int]) -> tuple[int, ...]:
    """Documents whose identifier this is (empty when none)."""
    return self._table.get(_strip_tail(identifier, self.strip_ids), ())

  def rank(self, hypotheses: Sequence[Sequence[int]], scores: Sequence[float] | None = None,
           k: int | None = None) -> DocRanking:
    """Documents in first-hit order.

    Args:
      hypotheses: identifier token sequences, best first (already cut to their lengths).
      scores: per hypothesis score (e.g. beam log-probability); zeros when None.
      k: keep at most this many documents.
    """
    if scores is not None and len(scores) != len(hypotheses):
      raise InputError(f"{len(hypotheses)} hypotheses but {len(scores)} scores", key="scores")
    seen: set[int] = set()
    docs, out_scores, ranks = [], [], []
    invalid = dupes = 0
    for i, hyp in enumerate(hypotheses):
      hit = self.lookup(hyp)
      if not hit:
        invalid += 1
        continue
      for d in hit:
        if d in seen:
          dupes += 1
          continue
        seen.add(d)
        docs.append(d)
        out_scores.append(0.0 if scores is None else float(scores[i]))
        ranks.append(i)
    if k is not None:
      docs, out_scores, ranks = docs[:k], out_scores[:k], ranks[:k]
    return DocRanking(np.array(docs, np.int64), np.array(out_scores, np.float64), np.array(ranks, np.int64),
                      invalid, dupes)


def hypotheses_from_beams(tokens: np.ndarray, lengths: np.ndarray, valid: np.ndarray | None = None
                          ) -> tuple[list[tuple[int, ...]], np.ndarray]:
  """Cuts padded beam outputs [k, L] to their lengths, dropping invalid (unfinished / padding) beams.

  Returns:
    The kept hypotheses and their row indices (to select the matching scores).
  """
  tokens = np.asarray(tokens)
  lengths = np.asarray(lengths)
  if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
    raise InputError(f"expected tokens [k, L] and lengths [k], got {tokens.shape} and {lengths.shape}",
                     key="beam_outputs")
  keep = np.ones(len(tokens), bool) if valid is None else np.asarray(valid, bool)
  rows = np.flatnonzero(keep)
  return [tuple(int(t) for t in tokens[i, :int(lengths[i])]) for i in rows], rows
