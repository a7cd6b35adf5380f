"""A tiny seqio task for trainer tests, independent of the corpus/identifier stages: reverse short word lists,
tokenised with the small SentencePiece model in ../shared/data/tokenizers."""

import os
import pathlib

import seqio
import tensorflow as tf

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DATA = pathlib.Path(os.environ.get("GENRET_SHARED_DATA", _ROOT.parent / "shared" / "data"))
SPM = str(_DATA / "tokenizers" / "sentencepiece_botchan" / "botchan_en_unigram_1000.model")
VOCAB = seqio.SentencePieceVocabulary(SPM)
WORDS = ("the cat sat on a mat while old men read long books about red ships and small birds near the sea "
         "under a quiet sky").split()
TASK = "genret_test_reverse"


def _examples(split: str, n: int):
  rows = []
  offset = 0 if split == "train" else 1000
  for i in range(n):
    k = 3 + (i + offset) % 4
    words = [WORDS[(i * 7 + offset + j * 3) % len(WORDS)] for j in range(k)]
    rows.append((" ".join(words), " ".join(reversed(words))))
  return rows


def _source(split: str, shuffle_files: bool, seed=None):
  del shuffle_files, seed
  rows = _examples(split, 256 if split == "train" else 32)
  return tf.data.Dataset.from_tensor_slices({"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows]})


if TASK not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      TASK,
      source=seqio.FunctionDataSource(_source, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)})
