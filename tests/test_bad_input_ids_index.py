"""Bad input to convert-hf, build-ids, build-index and model-info ends in one InputError line naming the file or
option (it was silently dropped tensors, sklearn tracebacks, sequential "semantic" ids, out-of-vocabulary indexes,
or a mesh shown as 1x1x1)."""

import json

import numpy as np
import pytest

from genret_jax import cli, identifiers
from genret_jax.corpora.types import Collection, Document
from genret_jax.errors import InputError


def _error(capsys, *argv) -> str:
  assert cli.main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err, err
  return err


# ---- convert-hf: every tensor is converted or knowingly ignored -----------------------------------------------
def _save_t5(path, layers):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=layers,
                              num_decoder_layers=layers, num_heads=2, relative_attention_num_buckets=8,
                              feed_forward_proj="gated-gelu", decoder_start_token_id=0)
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)


def _set_config(path, **values):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(values)
  (path / "config.json").write_text(json.dumps(cfg))


def test_convert_hf_refuses_tensors_the_config_does_not_use(tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  from genret_jax.models import hf_convert
  hf = tmp_path / "hf"
  _save_t5(hf, layers=2)
  hf_convert.load_hf(hf, dtype="float32")   # as saved: every tensor used
  _set_config(hf, num_layers=1, num_decoder_layers=1)   # the second layer of each stack was dropped, rc 0
  capsys.readouterr()   # save_pretrained's progress bar
  with pytest.raises(InputError, match=r"23 tensor\(s\) that config.json does not account for .*"
                                       r"decoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight") as e:
    hf_convert.load_hf(hf, dtype="float32")
  assert e.value.path == str(hf / "model.safetensors")
  err = _error(capsys, "convert-hf", "--hf_dir", str(hf), "--out", str(tmp_path / "out"))
  assert f"{hf}/model.safetensors: 23 tensor(s)" in err and not (tmp_path / "out").exists()
  # One stray tensor in a checkpoint that matches its config.
  _set_config(hf, num_layers=2, num_decoder_layers=2)
  weights = load_file(str(hf / "model.safetensors"))
  save_file({**weights, "encoder.extra.weight": np.ones((2, 2), np.float32)}, str(hf / "model.safetensors"),
            metadata={"format": "pt"})
  with pytest.raises(InputError, match=r"1 tensor\(s\) .*: encoder\.extra\.weight;"):
    hf_convert.load_hf(hf, dtype="float32")
  # What HF itself writes and ties is fine: the stacks' embed_tokens copies, a tied lm_head equal to `shared`.
  shared = weights["shared.weight"]
  save_file({**weights, "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared,
             "lm_head.weight": shared}, str(hf / "model.safetensors"), metadata={"format": "pt"})
  config, _ = hf_convert.load_hf(hf, dtype="float32")
  assert config.tie_word_embeddings
  # More layers in config.json than in the weights: named, not a KeyError traceback.
  _set_config(hf, num_layers=3)
  with pytest.raises(InputError, match=r"'encoder\.block\.2\.layer\.0\.layer_norm\.weight' missing"):
    hf_convert.load_hf(hf, dtype="float32")


def test_convert_hf_ignores_llama_rotary_buffers_and_tied_head(tmp_path):
  import torch
  import transformers
  from safetensors.numpy import load_file, save_file
  from genret_jax.models import hf_convert
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=True)
  transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
  weights = load_file(str(tmp_path / "model.safetensors"))
  embed = weights["model.embed_tokens.weight"]
  save_file({**weights, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32),
             "lm_head.weight": embed}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  hf_convert.load_hf(tmp_path, dtype="float32")
  # A tied config with a different stored head: the head would be dropped.
  save_file({**weights, "lm_head.weight": embed + 1}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(InputError, match=r"1 tensor\(s\) .*: lm_head\.weight;"):
    hf_convert.load_hf(tmp_path, dtype="float32")


# ---- build-ids: seed and every scheme_config option checked up front -------------------------------------------
def _toy(n=12):
  words = "wing lift drag flow shock heat plate boundary layer nozzle jet pressure".split()
  docs = [Document(str(i), f"title {i}", " ".join(words[(i + k) % len(words)] for k in range(6))) for i in range(n)]
  return Collection("toy", docs, [], {})


@pytest.fixture()
def toy_corpus(tmp_path):
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join(json.dumps({"_id": d.doc_id, "title": d.title, "text": d.text}) + "\n"
                          for d in _toy().documents))
  return path


@pytest.mark.parametrize("scheme,config,message", [
    ("semantic", {"branching": "ten"}, "scheme_config.branching: must be an integer >= 2, got 'ten'"),
    ("semantic", {"dim": 2.5, "leaf_size": 5}, "scheme_config.dim: must be an integer >= 1, got 2.5"),
    ("semantic", {"max_features": 0, "leaf_size": 5}, "scheme_config.max_features: must be an integer >= 1"),
    ("semantic", {"dim": -3, "leaf_size": 5}, "scheme_config.dim: must be an integer >= 1, got -3"),
    ("semantic", {"token_format": "words"}, "scheme_config.token_format: must be one of ['digits', 'tokens']"),
    ("semantic", {"leaf_size": True}, "scheme_config.leaf_size: must be an integer >= 1, got True"),
    ("codebook", {"codes": 1}, "scheme_config.codes: must be an integer >= 2, got 1"),
    ("codebook", {"levels": "3"}, "scheme_config.levels: must be an integer >= 1"),
    ("codebook", {"dim": 0}, "scheme_config.dim: must be an integer >= 1, got 0"),
    ("ngram", {"views": ["body", "nope"]}, "scheme_config.views: must be a non-empty list of strings from"),
    ("ngram", {"views": "body"}, "scheme_config.views: must be a list of strings"),
    ("ngram", {"min_length": 5, "max_length": 3}, "scheme_config.min_length: min_length 5 > max_length 3"),
    ("ngram", {"temperature": "hot"}, "scheme_config.temperature: must be a number > 0.0"),
    ("ngram", {"index_pairs": -1}, "scheme_config.index_pairs: must be an integer >= 0"),
    ("ngram", {"title_marker": "<t eos>"}, "scheme_config.title_marker: must be a non-empty string without"),
    ("atomic", {"token_prefix": ""}, "scheme_config.token_prefix: must be a non-empty string without"),
    ("title", {"lowercase": "yes"}, "scheme_config.lowercase: must be true or false"),
])
def test_build_ids_checks_scheme_config(toy_corpus, tmp_path, capsys, scheme, config, message):
  err = _error(capsys, "build-ids", "--corpus", str(toy_corpus), "--scheme", scheme,
               "--scheme_config", json.dumps(config), "--output", str(tmp_path / "ids"))
  assert err.startswith("genret build-ids: error: config key ") and message in err, err
  with pytest.raises(InputError) as e:
    identifiers.build(scheme, _toy(), **config)
  assert e.value.key == "scheme_config." + next(iter(config))


@pytest.mark.parametrize("scheme", ["semantic", "codebook"])
def test_build_ids_checks_seed(toy_corpus, tmp_path, capsys, scheme):
  for seed, bound in (("-5", ">= 0"), (str(2**32), f"<= {2**32 - 1}")):
    err = _error(capsys, "build-ids", "--corpus", str(toy_corpus), "--scheme", scheme, "--seed", seed,
                 "--output", str(tmp_path / "ids"))
    assert f"config key --seed: must be an integer {bound}, got {seed}" in err
  with pytest.raises(InputError, match="config key seed: must be an integer >= 0"):
    identifiers.build(scheme, _toy(), seed=-1)


def test_valid_learned_configs_still_cluster():
  sem = identifiers.build("semantic", _toy(), seed=3, branching=2, leaf_size=4, dim=4, max_features=50)
  assert max(len(p) for p in sem.paths) >= 2    # clustered, not numbered in order
  cb = identifiers.build("codebook", _toy(), levels=2, codes=2, dim=4)
  assert len(set(cb.docids)) == 12
  ng = identifiers.build("ngram", _toy(), views=["body", "title"], temperature=2)
  assert ng.config.views == ("body", "title") and ng.config.temperature == 2.0


def test_doc_vectors_do_not_swallow_parameter_errors():
  """A bad TF-IDF parameter was caught as 'every document empty' and gave identical (zero) vectors."""
  from genret_jax.identifiers.doc_vectors import _vectors
  with pytest.raises(ValueError, match="max_features"):
    _vectors(["wing lift", "drag flow"], 4, 0, 0)
  assert not _vectors(["the and", "of"], 4, 0, 10).any()   # stop words only: still zero vectors


# ---- build-index: ids and separator within --vocab_size --------------------------------------------------------
def test_build_index_spm_model_larger_than_vocab(toy_corpus, tmp_path, capsys):
  from genret_jax.identifiers import vocab
  from genret_jax.decoding import SuffixArrayIndex
  spm_path = tmp_path / "v.model"
  vocab.write_model(vocab.train_sentencepiece(vocab.corpus_sentences(_toy()), 60), str(spm_path))
  import sentencepiece as spm
  pieces = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
  err = _error(capsys, "build-index", "--kind=suffix_array", f"--corpus={toy_corpus}", f"--spm_model={spm_path}",
               "--vocab_size=20", f"--output_dir={tmp_path / 'sa'}")
  assert f"{spm_path}: the SentencePiece model has {pieces} pieces" in err and "--vocab_size is 20" in err
  assert cli.main(["build-index", f"--corpus={toy_corpus}", f"--spm_model={spm_path}", f"--vocab_size={pieces}",
                   f"--sep_id={pieces}", f"--output_dir={tmp_path / 'sa'}"]) == 0
  assert SuffixArrayIndex.load(str(tmp_path / "sa")).num_docs == 12


def test_build_index_separator_within_vocab(tmp_path, capsys):
  toks = tmp_path / "docs.txt"
  toks.write_text("5 6 7\n8 9\n")
  err = _error(capsys, "build-index", f"--tokens_file={toks}", "--sep_id=50", "--vocab_size=20",
               f"--output_dir={tmp_path / 'sa'}")
  assert "config key build_index.sep_id: --sep_id 50 is past --vocab_size 20" in err
  assert "build_index.eos_id: --eos_id 30 >= --vocab_size 20" in _error(
      capsys, "build-index", "--kind=trie", f"--tokens_file={toks}", "--eos_id=30", "--vocab_size=20",
      f"--output_dir={tmp_path / 't'}")
  assert "build_index.sep_id: must be an integer >= 0, got -1" in _error(
      capsys, "build-index", f"--tokens_file={toks}", "--sep_id=-1", f"--output_dir={tmp_path / 'sa'}")
  # One past the vocabulary is the separator `--task` indexes use: still accepted.
  assert cli.main(["build-index", f"--tokens_file={toks}", "--sep_id=20", "--vocab_size=20",
                   f"--output_dir={tmp_path / 'sa'}"]) == 0


# ---- model-info: the mesh check `genret train` applies ---------------------------------------------------------
def test_model_info_refuses_two_inferred_mesh_axes(capsys):
  import gin
  try:
    err = _error(capsys, "model-info", "--gin_file=models/t5_1_1/tiny.gin", "--mesh", "data=-1,model=-1")
    assert err.endswith("config key --mesh: at most one mesh axis may be -1, got data=-1 fsdp=1 model=-1")
    from genret_jax.models import info
    assert info._parse_mesh("data=-1,model=2") == {"data": -1, "fsdp": 1, "model": 2}
  finally:
    gin.clear_config()
