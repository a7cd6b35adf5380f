"""seqio tasks used exactly as a t5x project would: `import tasks`, get_mixture_or_task, feature converters."""

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def tasks_module(tmp_path_factory, shared_data):
  # Built artefacts (vocabulary, identifiers, examples) go to a session cache; registration reads the env.
  os.environ["GENRET_CACHE"] = str(tmp_path_factory.mktemp("genret_cache"))
  os.environ["GENRET_SHARED_DATA"] = str(shared_data)
  os.environ.setdefault("GENRET_DEFAULT_SCHEMES", "atomic,naive,title,semantic,codebook,ngram")
  import tasks  # pylint: disable=g-import-not-at-top
  return tasks


LENGTHS = {"inputs": 48, "targets": 16}


def _rows(ds, *keys):
  return [tuple(ex[k].decode() if isinstance(ex[k], bytes) else ex[k] for k in keys)
          for ex in ds.as_numpy_iterator()]


def test_t5x_style_reuse(tasks_module):
  import seqio
  name = "genret_cranfield_atomic_retrieval"
  assert name in seqio.TaskRegistry.names()
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length=LENGTHS, split="train", shuffle=False)
  ex = next(ds.as_numpy_iterator())
  assert ex["targets"][-1] == 1 and ex["inputs"][-1] == 1  # EOS appended
  vocab = task.output_features["targets"].vocabulary
  assert vocab.decode(ex["targets"].tolist()) == ex["targets_pretokenized"].decode()
  assert ex["targets_pretokenized"].decode().startswith("<d_")
  encdec = seqio.get_dataset(mixture_or_task_name=name, task_feature_lengths=LENGTHS, dataset_split="train",
                             shuffle=False, feature_converter=seqio.EncDecFeatureConverter(pack=False),
                             batch_size=4)
  batch = next(encdec.as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, 48)
  assert batch["decoder_target_tokens"].shape == (4, 16)
  assert (batch["decoder_loss_weights"].sum(1) == (batch["decoder_target_tokens"] != 0).sum(1)).all()
  prefix_lm = seqio.get_dataset(mixture_or_task_name="genret_cranfield_atomic", task_feature_lengths=LENGTHS,
                                dataset_split="train", shuffle=True, seed=0, batch_size=4,
                                feature_converter=seqio.DecoderFeatureConverter(pack=True))
  batch = next(prefix_lm.as_numpy_iterator())
  assert batch["decoder_target_tokens"].shape == (4, 64) and "decoder_causal_attention" in batch


def test_splits_and_nested_fractions(tasks_module):
  import seqio
  art = tasks_module.artefacts_for("genret_cranfield_atomic_retrieval")
  splits = art.query_splits()  # Cranfield has one split: seeded train/validation/test
  ids = {k: {q.query_id for q in v} for k, v in splits.items()}
  assert set(ids) == {"train", "validation", "test"}
  assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
  assert sum(map(len, ids.values())) == 225 and len(ids["validation"]) == len(ids["test"]) == 22
  pairs = {}
  for f in ("_f020", "_f040", "_f060", "_f080", ""):
    ds = seqio.get_mixture_or_task(f"genret_cranfield_atomic_retrieval{f}").get_dataset(
        sequence_length=LENGTHS, split="train", shuffle=False)
    pairs[f] = set(_rows(ds, "query_id", "doc_id"))
  sizes = [len(pairs[f]) for f in ("_f020", "_f040", "_f060", "_f080", "")]
  assert sizes == sorted(sizes) and sizes[0] > 0
  assert pairs["_f020"] <= pairs["_f040"] <= pairs["_f060"] <= pairs["_f080"] <= pairs[""]
  assert abs(sizes[1] / sizes[-1] - 0.4) < 0.01
  # Evaluation splits are never reduced.
  v = seqio.get_mixture_or_task("genret_cranfield_atomic_retrieval_f020").get_dataset(
      sequence_length=LENGTHS, split="validation", shuffle=False)
  assert {q for q, _ in _rows(v, "query_id", "doc_id")} == ids["validation"]
  # SciFact keeps its own test split and carves validation out of train.
  sci = tasks_module.artefacts_for("genret_scifact_title").query_splits()
  assert len(sci["test"]) == 300 and len(sci["train"]) + len(sci["validation"]) == 809



def test_mixtures_draw_tasks_in_proportion_to_their_examples(tasks_module):
  """One epoch of a mixture is one pass over both tasks at every data fraction (equal rates drew indexing and
  retrieval 50/50, so a smaller fraction repeated its pairs more often and the data axis was confounded)."""
  import seqio
  art = tasks_module.artefacts_for("genret_cranfield_atomic")
  for suffix, fraction in (("", 1.0), ("_f020", 0.2), ("_f060", 0.6)):
    mix = seqio.get_mixture_or_task(f"genret_cranfield_atomic{suffix}")
    retrieval, indexing = art.num_train_examples(fraction)
    rates = {"indexing" if t.name.endswith("_indexing") else "retrieval": mix.get_rate(t) for t in mix.tasks}
    assert rates == {"indexing": indexing, "retrieval": retrieval} and indexing > 0 and retrieval > 0
  # The sampled batches follow the counts.
  ds = seqio.get_mixture_or_task("genret_cranfield_atomic_f020").get_dataset(
      sequence_length=LENGTHS, split="train", shuffle=True, seed=0, passthrough_features=["query_id"])
  kinds = [bool(q) for (q,) in _rows(ds.take(2000), "query_id")]   # indexing examples have none
  retrieval, indexing = art.num_train_examples(0.2)
  assert abs(sum(kinds) / len(kinds) - retrieval / (retrieval + indexing)) < 0.05
  # Fixed weights, given together, still work; one alone is refused.
  names = tasks_module.register_collection_tasks("cranfield", art.collection_path, "atomic",
                                                 task_prefix="test_fixed_rates", indexing_rate=1.0,
                                                 retrieval_rate=3.0, data_fractions=(1.0,))
  mix = seqio.get_mixture_or_task(names["mixture"])
  assert sorted(mix.get_rate(t) for t in mix.tasks) == [1.0, 3.0]
  from genret_jax.errors import InputError
  with pytest.raises(InputError, match="retrieval_rate"):
    tasks_module.register_collection_tasks("cranfield", art.collection_path, "atomic", task_prefix="test_one_rate",
                                           indexing_rate=1.0)


def test_fraction_names_never_collide(tasks_module):
  suffix = tasks_module.fraction_suffix
  assert [suffix(f) for f in (0.2, 1.0, 0.05)] == ["_f020", "_f100", "_f005"]
  assert [suffix(f) for f in (0.001, 0.002, 0.125, 0.12)] == ["_f0p001", "_f0p002", "_f0p125", "_f012"]
  from genret_jax.errors import InputError
  with pytest.raises(InputError, match="too close"):
    tasks_module.check_distinct_fractions([0.1234561, 0.1234562])
  from genret_jax.scaling import sweep
  cfg = sweep.SweepConfig(rungs={"t5": ["models/t5_1_1/cpu_ladder/r0.gin"]}, data_fractions=(0.001, 0.002, 0.004),
                          fraction_rungs=(0,))
  assert [c["model_id"] for c in sweep.plan(cfg)] == ["t5-r0-f0p001", "t5-r0-f0p002", "t5-r0-f0p004",
                                                       "t5-r0-f100"]


def test_edited_queries_or_judgments_get_new_artefacts(tasks_module, tmp_path):
  """The cache entry is keyed by the queries and qrels as well as the documents: the retrieval examples are
  built from them (an edited query text or qrel was served from the old entry)."""
  import json as json_lib
  import shutil
  src = tmp_path / "c"
  shutil.copytree(tasks_module.shared_data_dir() + "/cranfield", src)
  def artefacts(name):
    names = tasks_module.register_collection_tasks("cranfield", str(src), "atomic", task_prefix=name,
                                                   data_fractions=(1.0,))
    return tasks_module.artefacts_for(names["mixture"])
  before = artefacts("test_edit_a")
  train, where, docs = before.retrieval_examples("train"), before.directory(), before.fingerprint()
  queries = [json_lib.loads(line) for line in open(src / "queries.jsonl")]
  for q in queries:
    q["text"] = "edited " + q["text"]
  (src / "queries.jsonl").write_text("".join(json_lib.dumps(q) + "\n" for q in queries))
  from tasks import artefacts as artefacts_module
  artefacts_module._collections.clear()   # what a new process would see: the edited files, read again
  artefacts_module._memo.clear()
  after = artefacts("test_edit_b")
  assert after.fingerprint() == docs and after.directory() != where
  edited = after.retrieval_examples("train")
  assert len(edited) == len(train) and all(g[0]["inputs"].startswith("edited ") for g in edited)


def test_query_prefix_travels_with_the_artefacts(tasks_module):
  """Sweeps and `genret retrieve` read the task's query prefix from its artefacts, so a model trained with a
  prefix is evaluated with it (they used none); the cached artefacts are shared with the unprefixed task."""
  plain = tasks_module.artefacts_for(tasks_module.register_collection_tasks(
      "cranfield", tasks_module.shared_data_dir() + "/cranfield", "atomic", task_prefix="test_noprefix",
      data_fractions=(1.0,))["mixture"])
  prefixed = tasks_module.artefacts_for(tasks_module.register_collection_tasks(
      "cranfield", tasks_module.shared_data_dir() + "/cranfield", "atomic", task_prefix="test_prefix",
      data_fractions=(1.0,), query_prefix="query: ")["mixture"])
  assert (plain.query_prefix, prefixed.query_prefix) == ("", "query: ")
  assert plain.directory() == prefixed.directory()

def test_indexing_task_and_default_corpus(tasks_module):
  import seqio
  ds = seqio.get_mixture_or_task("genret_default_title_indexing").get_dataset(
      sequence_length={"inputs": 64, "targets": 24}, split="train", shuffle=False)
  rows = _rows(ds, "inputs_pretokenized", "targets_pretokenized", "doc_id")
  art = tasks_module.artefacts_for("genret_default_title_indexing")
  scheme = art.identifier_scheme()
  assert len(rows) == len(art.collection().documents)
  for _, target, doc_id in rows[:50]:
    assert scheme.docs_for(target) == [art.collection().doc_index(doc_id)]
  names = seqio.MixtureRegistry.names()
  for corpus in ("default", "cranfield", "scifact"):
    for scheme_name in ("atomic", "naive", "title", "semantic", "codebook", "ngram"):
      assert f"genret_{corpus}_{scheme_name}" in names and f"genret_{corpus}_{scheme_name}_f040" in names


def test_ngram_task_targets_are_spans(tasks_module, tmp_path):
  import seqio
  # A few SciFact claims through the n-gram task: spans of the positive document, markers in the vocab.
  names = tasks_module.register_collection_tasks(
      "scifact", os.environ["GENRET_SHARED_DATA"] + "/scifact", "ngram", task_prefix="test_scifact_ngram",
      scheme_config={"n_samples": 3}, validation_fraction=0.02, data_fractions=(0.5, 1.0),
      vocab_path=os.environ["GENRET_SHARED_DATA"] + "/tokenizers/sentencepiece_botchan/botchan_en_unigram_1000.model")
  assert names["retrieval_f050"] == "test_scifact_ngram_retrieval_f050"
  task = seqio.get_mixture_or_task("test_scifact_ngram_retrieval")
  art = tasks_module.artefacts_for("test_scifact_ngram_retrieval")
  ds = task.get_dataset(sequence_length={"inputs": 64, "targets": 16}, split="validation", shuffle=False)
  rows = _rows(ds, "targets_pretokenized", "doc_id")
  assert len(rows) == 3 * len(art.retrieval_pairs("validation")) > 0
  scheme = art.identifier_scheme()
  for target, doc_id in rows:
    assert art.collection().doc_index(doc_id) in scheme.docs_for(target)
  vocab = task.output_features["targets"].vocabulary  # the existing model, extended with the markers
  assert vocab.vocab_size == 1003 and vocab.encode("<title_eos>")[-1] == 1000


def test_bad_registration_fails_at_registration(tasks_module):
  from genret_jax.errors import InputError
  with pytest.raises(InputError) as e:
    tasks_module.register_collection_tasks("x", "default", "semantic", scheme_config={"leafsize": 3})
  assert e.value.key == "leafsize"
  with pytest.raises(InputError, match="unknown identifier scheme"):
    tasks_module.register_collection_tasks("x", "default", "bogus")
  with pytest.raises(InputError) as e:
    tasks_module.register_collection_tasks("x", "default", "naive", data_fractions=(0.0, 1.0))
  assert e.value.key == "data_fractions"


def test_gin_collection_task(tasks_module):
  import gin
  gin.clear_config()
  gin.parse_config([
      "tasks.collection_task.collection_name = 'default'",
      "tasks.collection_task.collection_path = 'default'",
      "tasks.collection_task.scheme = 'naive'",
      "tasks.collection_task.fraction = 0.6",
      "tasks.collection_task.task_prefix = 'gin_default_naive'",
  ])
  try:
    assert tasks_module.collection_task() == "gin_default_naive_f060"
    assert tasks_module.collection_task(role="retrieval") == "gin_default_naive_retrieval_f060"
  finally:
    gin.clear_config()


@pytest.mark.slow
def test_beam_cache_tasks_main(tasks_module, tmp_path):
  import seqio
  out = tmp_path / "cache"
  env = dict(os.environ, GENRET_DEFAULT_SCHEMES="naive", PYTHONPATH=os.getcwd())
  proc = subprocess.run(
      [sys.executable, "-m", "seqio.scripts.cache_tasks_main", "--module_import=tasks",
       "--tasks=genret_default_naive_indexing", f"--output_cache_dir={out}", "--min_shards=4"],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  task_dir = out / "genret_default_naive_indexing"
  assert (task_dir / "info.train.json").exists()
  seqio.add_global_cache_dirs([str(out)])
  ds = seqio.get_mixture_or_task("genret_default_naive_indexing").get_dataset(
      sequence_length={"inputs": 32, "targets": 8}, split="train", use_cached=True, shuffle=False)
  first = next(ds.as_numpy_iterator())
  assert first["targets"][-1] == 1 and len(first["inputs"]) <= 32
