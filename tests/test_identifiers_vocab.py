"""SentencePiece vocabularies: T5 ids, added tokens as single pieces, determinism, extending a model."""

import hashlib
import json

import pytest
import sentencepiece as spm

from genret_jax import cli, corpora, identifiers
from genret_jax.corpora.types import Collection
from genret_jax.errors import InputError
from genret_jax.identifiers import vocab


@pytest.fixture(scope="session")
def cranfield(cranfield_dir):
  return corpora.load(str(cranfield_dir))


@pytest.fixture(scope="session")
def botchan_model(shared_data):
  return str(shared_data / "tokenizers" / "sentencepiece_botchan" / "botchan_en_unigram_1000.model")


def test_trained_vocab_is_deterministic_with_t5_ids(cranfield):
  # A 400-document slice keeps the two trainings fast; the settings are the ones used at full size.
  part = Collection("cranfield400", cranfield.documents[:400], cranfield.queries, {})
  tokens = identifiers.build("atomic", part).added_tokens() + ["<title_eos>"]
  a = vocab.train_sentencepiece(vocab.corpus_sentences(part), 500, added_tokens=tokens, seed=0)
  b = vocab.train_sentencepiece(vocab.corpus_sentences(part), 500, added_tokens=tokens, seed=0)
  assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
  sp = spm.SentencePieceProcessor(model_proto=a)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert vocab.check_single_pieces(a, tokens) == []
  assert sp.encode("<d_12><d_7>", out_type=str) == ["▁", "<d_12>", "<d_7>"]


def test_add_tokens_to_existing_model(botchan_model, tmp_path):
  base = vocab.read_model(botchan_model)
  tokens = ["<c0_1>", "<c1_15>", "<title_eos>"]
  extended = vocab.add_tokens(base, tokens + ["<c0_1>"])  # duplicates are added once
  old, new = spm.SentencePieceProcessor(model_proto=base), spm.SentencePieceProcessor(model_proto=extended)
  assert new.get_piece_size() == old.get_piece_size() + 3
  text = "I am a cat. I have no name yet."
  assert new.encode(text) == old.encode(text)  # existing ids unchanged
  assert vocab.check_single_pieces(extended, tokens) == []
  path = vocab.write_model(extended, str(tmp_path / "ext.model"))
  v = vocab.seqio_vocabulary(path)
  ids = v.encode("cat <c0_1><c1_15>")
  assert v.decode(ids) == "cat <c0_1><c1_15>"
  assert new.piece_to_id("<c1_15>") in ids
  with pytest.raises(InputError):
    vocab.add_tokens(base, ["has space"])
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(InputError):
    vocab.read_model(str(tmp_path / "junk.model"))


def test_encode_batch_equals_one_text_at_a_time(botchan_model, tmp_path):
  path = vocab.write_model(vocab.add_tokens(vocab.read_model(botchan_model), ["<title_eos>"]),
                           str(tmp_path / "v.model"))
  v = vocab.seqio_vocabulary(path, extra_ids=5)
  texts = ["I am a cat.", "", "  spaces  ", "Ünïcode and <title_eos> tokens", "x" * 3000, "I am a cat."] * 3
  want = [list(v.encode(t)) for t in texts]
  assert vocab.encode_batch(v, texts) == want
  assert vocab.encode_batch(v, texts, chunk=4) == want   # chunk boundaries do not matter

  class Words:   # any other vocabulary: one encode call per text
    def encode(self, t):
      return [len(w) for w in t.split()]
  assert vocab.encode_batch(Words(), ["a bb", ""]) == [[1, 2], []]


def test_build_vocab_cli(cranfield_dir, botchan_model, tmp_path, capsys):
  out = tmp_path / "v.model"
  rc = cli.main(["build-vocab", f"--corpus={cranfield_dir}", "--scheme=codebook",
                 '--scheme_config={"levels": 2, "codes": 8, "dim": 8}', f"--base_model={botchan_model}",
                 f"--output={out}"])
  assert rc == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["added_tokens"] >= 16 and summary["pieces"] == 1000 + summary["added_tokens"]
  assert vocab.check_single_pieces(out.read_bytes(), ["<c0_0>", "<c1_7>"]) == []
  assert cli.main(["build-vocab", f"--corpus={cranfield_dir}", "--scheme=nope", f"--output={out}"]) == 2
