"""Decoding: the one beam search (`beam_search`) and its constraints — `TrieConstraint` (docid schemes),
`SubstringConstraint` over a `SuffixArrayIndex` (n-gram identifiers; `ShardedSubstringConstraint` over several
suffix-array shards), `Unconstrained`.

"""

from genret_jax.decoding.beam_search import (BeamSearchOutput, NgramHistory, beam_search, hypotheses,
                                             length_penalty, ngram_history)
from genret_jax.decoding.constraints import NEG_INF, Constraint, Unconstrained
from genret_jax.decoding.sharded_substring import ShardedSubstringConstraint
from genret_jax.decoding.substring import SubstringConstraint, SubstringState
from genret_jax.decoding.suffix_array import SuffixArrayIndex
from genret_jax.decoding.trie import TrieConstraint

__all__ = ["BeamSearchOutput", "Constraint", "NEG_INF", "NgramHistory", "ShardedSubstringConstraint",
           "SubstringConstraint", "SubstringState", "SuffixArrayIndex", "TrieConstraint", "Unconstrained",
           "beam_search", "hypotheses", "length_penalty", "ngram_history"]
