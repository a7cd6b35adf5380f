"""`genret sweep`: family x size rung x data fraction x beam, each model trained once, then CGL and retrieval.

Layout of a sweep directory (the results format of docs/scaling.md):
  sweep.gin                       the operative sweep config
  negatives.json                  the CGL negatives, drawn once (seeded) and shared by every model
  models/<model_id>/              the trainer's MODEL_DIR (checkpoints, TensorBoard, params)
  cells/<model_id>/result.json    written atomically when the model's evaluation is complete
  cells/<model_id>-b<beam>/per_query.json
  results.csv                     rebuilt (atomically) from every result.json

A restarted sweep skips models whose result.json exists. A model killed half way has no result.json, so it is
redone (its trainer resumes from its last checkpoint) and never read as done.

The directory may be a URL (gs://), as MODEL_DIR may: every file goes through `genret_jax.filesystem` and
`atomic_files` (nothing is appended to or renamed within in place).

On several hosts (`genret train`'s flags) every process runs every step: each model trains on the mesh of every
host's devices (models/ must be a directory every host sees, as MODEL_DIR is for `genret train`: a gs:// sweep
directory is), and CGL and
retrieval run on that mesh too. Process 0 alone reads and writes the rest of the sweep directory (sweep.gin,
negatives.json, cells/, results.csv, the report) and gives the others what it read (which models are done, their
rows), so the other hosts need not see those files. A step that fails on one process stops every process
(`genret_jax.multihost`), and processes given different sweeps stop before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import numbers
import os
import time
from typing import Mapping, Sequence

import gin
import jax
import numpy as np

from genret_jax import atomic_files, filesystem, gin_utils, multihost
from genret_jax.errors import InputError, Preempted, check_float, check_int
from genret_jax.scaling import results as results_lib

RESULT_JSON = "result.json"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SweepConfig:
  collection_name: str = "default"
  collection_path: str = "default"
  scheme: str = "ngram"
  vocab_size: int = 2000
  scheme_config: dict | None = None
  # family -> rung gin files (resolved against gin_configs/), smallest first.
  rungs: dict = dataclasses.field(default_factory=dict)
  data_fractions: Sequence[float] = (1.0,)
  # Which rungs (indices into each family's list) also train at the smaller data fractions: default the last.
  fraction_rungs: Sequence[int] = (-1,)
  # Families that get the data sweep (empty = all).
  fraction_families: Sequence[str] = ()
  beams: Sequence[int] = (1, 5, 10, 20)
  # Which rungs get the whole beam sweep; the others are decoded at `default_beam` only.
  beam_rungs: Sequence[int] = (-1,)
  default_beam: int = 10
  run_gin: str = "runs/train.gin"
  extra_bindings: Sequence[str] = ()
  # Same epochs over the retrieval data for every fraction (steps grow with D; the mixtures draw each task in
  # proportion to its examples), same batch size: the data axis is not confounded with batch size as in the
  # reference.
  train_epochs: float = 10.0
  min_train_steps: int = 50
  max_train_steps: int = 100000
  batch_size: int = 32
  task_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"inputs": 64, "targets": 16})
  eval_split: str = "test"
  max_eval_queries: int = 0            # 0 = all queries of the split
  num_negatives: int = 256
  negatives_seed: int = 0
  seed: int = 0

  def __post_init__(self):
    # Checked when the config is built, before anything trains: a negative max_eval_queries or a 0
    # num_negatives failed after training (blaming the corpus or an internal key), min > max steps was clipped.
    key = lambda name: f"SweepConfig.{name}"  # noqa: E731
    if not isinstance(self.rungs, Mapping) or not all(
        isinstance(fam, str) and isinstance(files, (list, tuple)) and all(isinstance(f, str) for f in files)
        for fam, files in self.rungs.items()):
      raise InputError(f"must map each family to a list of rung gin files, e.g. {{\"t5\": [\"models/...gin\"]}}; "
                       f"got {self.rungs!r}", key=key("rungs"))
    for name in ("fraction_families", "fraction_rungs", "beam_rungs", "beams", "data_fractions"):
      if not isinstance(getattr(self, name), (list, tuple)):
        raise InputError(f"must be a list, e.g. ({getattr(self, name)!r},), got {getattr(self, name)!r}",
                         key=key(name))
    for f in self.data_fractions:
      check_float(f, key("data_fractions"), low=0.0, high=1.0, low_open=True)
    for fam in self.fraction_families:
      if not isinstance(fam, str):
        raise InputError(f"must list family names, got {fam!r}", key=key("fraction_families"))
    for name in ("fraction_rungs", "beam_rungs"):   # indices into each family's rung list (ranges: in plan)
      for i in getattr(self, name):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
          raise InputError(f"must list rung indices (integers), got {i!r}", key=key(name))
    check_float(self.train_epochs, key("train_epochs"), low=0.0, low_open=True)
    for name in ("min_train_steps", "max_train_steps", "batch_size", "num_negatives"):
      check_int(getattr(self, name), key(name), low=1)
    for name in ("max_eval_queries", "negatives_seed", "seed"):
      check_int(getattr(self, name), key(name), low=0)
    if self.min_train_steps > self.max_train_steps:
      raise InputError(f"min_train_steps {self.min_train_steps} is above max_train_steps {self.max_train_steps}",
                       key=key("min_train_steps"))
    lengths = self.task_feature_lengths
    if not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"}:
      raise InputError(f"must be {{\"inputs\": N, \"targets\": M}}, got {lengths!r}", key=key("task_feature_lengths"))
    for name, value in lengths.items():
      check_int(value, f"{key('task_feature_lengths')}[{name!r}]", low=1)


def _model_id(family: str, rung_gin: str, fraction: float) -> str:
  import tasks
  rung = os.path.splitext(os.path.basename(rung_gin))[0]
  return f"{family}-{rung}-{tasks.fraction_suffix(fraction)[1:]}"


def plan(cfg: SweepConfig) -> list[dict]:
  """Every model of the sweep, with the beams it is decoded at."""
  import tasks
  # Checked before anything trains: a typo in the last rung was found after the others had trained.
  if not cfg.rungs or not all(cfg.rungs.values()):
    raise InputError(f"no models to train: {cfg.rungs!r}", key="SweepConfig.rungs")
  for path in [cfg.run_gin, *(r for rungs in cfg.rungs.values() for r in rungs)]:
    if gin_utils.find_gin_file(path) is None:
      raise InputError("gin file not found (as given, or under gin_configs/)", path=path)
  cells = []
  fractions = sorted(set(float(f) for f in cfg.data_fractions) | {1.0})
  tasks.check_distinct_fractions(fractions, key="SweepConfig.data_fractions")
  for beam in cfg.beams:
    check_int(beam, "SweepConfig.beams")
  check_int(cfg.default_beam, "SweepConfig.default_beam")
  # Selections that chose nothing (a family typo, an index past a family's ladder, an empty list) silently
  # dropped the data or beam axis; every entry must select something.
  if not cfg.beams:
    raise InputError("no beams to decode at", key="SweepConfig.beams")
  unknown = [f for f in cfg.fraction_families if f not in cfg.rungs]
  if unknown:
    raise InputError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; the rungs have "
                     f"{sorted(cfg.rungs)}", key="SweepConfig.fraction_families")
  if len(fractions) > 1 and not cfg.fraction_rungs:
    raise InputError(f"selects no rung, so data fractions {[f for f in fractions if f < 1.0]} would train nothing",
                     key="SweepConfig.fraction_rungs")
  if set(cfg.beams) - {cfg.default_beam} and not cfg.beam_rungs:
    raise InputError(f"selects no rung, so beams {sorted(set(cfg.beams) - {cfg.default_beam})} would never be "
                     f"decoded (every rung gets default_beam {cfg.default_beam} only)", key="SweepConfig.beam_rungs")
  for family, rungs in cfg.rungs.items():
    n = len(rungs)
    gets_fractions = len(fractions) > 1 and (not cfg.fraction_families or family in cfg.fraction_families)
    for name, indices in (("fraction_rungs", cfg.fraction_rungs if gets_fractions else ()),
                          ("beam_rungs", cfg.beam_rungs)):
      bad = [i for i in indices if not -n <= i < n]
      if bad:
        raise InputError(f"rung index {bad[0]} is out of range for family {family!r}, which has {n} rung(s) "
                         f"(indices {-n}..{n - 1})", key=f"SweepConfig.{name}")
    frac_idx = {i % n for i in cfg.fraction_rungs} if gets_fractions else set()
    beam_idx = {i % n for i in cfg.beam_rungs}
    for i, rung in enumerate(rungs):
      for f in fractions:
        if f < 1.0 and i not in frac_idx:
          continue
        beams = sorted(set(cfg.beams)) if (i in beam_idx and f == 1.0) else [cfg.default_beam]
        cells.append({"model_id": _model_id(family, rung, f), "family": family, "rung": rung, "fraction": f,
                      "beams": beams})
  return cells


class Sweep:

  def __init__(self, cfg: SweepConfig, out_dir: str, config_path: str = "", progress: bool = True):
    self.cfg, self.config_path, self.progress = cfg, config_path, progress
    self.out_dir = filesystem.abspath(out_dir)
    self.stale_flops: list[str] = []   # finished models whose FLOP columns use an older count (done_rows)

    def make_dirs():
      filesystem.makedirs(os.path.join(self.out_dir, results_lib.CELLS_DIR))
      filesystem.makedirs(os.path.join(self.out_dir, "models"))

    multihost.from_process_0(make_dirs, what="creating the sweep directory")
    # Each model's MODEL_DIR: checked here, before the task artefacts are built, not at the first model's training.
    multihost.check_shared_directory(os.path.join(self.out_dir, "models"), key="--output_dir (its models/)")
    import tasks  # noqa: F401  (registers the seqio tasks)
    path = cfg.collection_path
    if path.startswith("shared:"):   # portable configs: a collection under ../shared/data or $GENRET_SHARED_DATA
      path = os.path.join(tasks.shared_data_dir(), path.split(":", 1)[1])

    def register():   # reads (or builds) the task's artefacts from this host's GENRET_CACHE
      return tasks.register_collection_tasks(
          cfg.collection_name, path, cfg.scheme, seed=cfg.seed, vocab_size=cfg.vocab_size,
          scheme_config=cfg.scheme_config,
          data_fractions=tuple(sorted(set(cfg.data_fractions) | {1.0})))

    self.names = multihost.agree(register, None, what="registering the sweep's tasks")
    self.artefacts = tasks.artefacts_for(self.names["mixture"])

  # ---- pieces ---------------------------------------------------------------------------------------------
  def _mixture(self, fraction: float) -> str:
    if fraction >= 1.0:
      return self.names["mixture"]
    import tasks
    return self.names[f"mixture{tasks.fraction_suffix(fraction)}"]

  def eval_queries(self):
    queries = self.artefacts.query_splits().get(self.cfg.eval_split, [])
    collection = self.artefacts.collection()
    queries = [q for q in queries if collection.positives(q.query_id, self.artefacts.min_grade)]
    if not queries:
      raise InputError(f"no judged queries in split {self.cfg.eval_split!r}", key="SweepConfig.eval_split")
    if self.cfg.max_eval_queries:
      queries = queries[:self.cfg.max_eval_queries]
    return queries

  def cgl_sequences(self):
    """Every (query, document, identifier) sequence of the CGL evaluation, built once per sweep: the negatives
    (saved as negatives.json, by process 0: `build_sequences` samples and saves them there, or reads them) and the
    query-biased spans are identical for every model."""
    if getattr(self, "_cgl_seqs", None) is None:
      from genret_jax.scaling import cgl_eval
      lengths = self.cfg.task_feature_lengths
      self._cgl_seqs = cgl_eval.build_sequences(
          self.artefacts.collection(), self.artefacts.identifier_scheme(), self.artefacts_vocab(),
          self.eval_queries(), target_seed=self.cfg.seed, num_negatives=self.cfg.num_negatives,
          negatives_seed=self.cfg.negatives_seed, negatives_path=os.path.join(self.out_dir, "negatives.json"),
          input_length=lengths["inputs"], target_length=lengths["targets"], min_grade=self.artefacts.min_grade,
          query_prefix=self.artefacts.query_prefix,
          targets_cache_dir=self.artefacts.directory())
    return self._cgl_seqs

  def _bindings(self, cell: dict, model_dir: str, steps: int) -> list[str]:
    lengths = json.dumps(dict(self.cfg.task_feature_lengths))
    return [f"MIXTURE_OR_TASK_NAME = '{self._mixture(cell['fraction'])}'", f"MODEL_DIR = '{model_dir}'",
            f"TRAIN_STEPS = {steps}", f"BATCH_SIZE = {self.cfg.batch_size}", f"TASK_FEATURE_LENGTHS = {lengths}",
            f"RANDOM_SEED = {self.cfg.seed}", f"VOCAB_SIZE = {self.model_vocab_size()}",
            f"train.progress = {self.progress}", *self._loss_positions(cell), *self.cfg.extra_bindings]

  def _loss_positions(self, cell: dict) -> list[str]:
    """Prefix-LM cells compute logits only at the target positions. With packing (several targets per row) bind
    `models.DecoderOnlyModel.loss_positions = 0` in extra_bindings (they come later and win); a row with more
    target tokens than this stops training with an error naming that key, never drops them."""
    if cell["family"] != "llama":
      return []
    return [f"models.DecoderOnlyModel.loss_positions = {int(self.cfg.task_feature_lengths['targets'])}"]

  def model_vocab_size(self) -> int:
    """The task vocabulary (corpus pieces + the scheme's added tokens), rounded up to a multiple of 128."""
    return int(math.ceil(self.artefacts_vocab().vocab_size / 128) * 128)

  def train_model(self, cell: dict):
    from genret_jax.training import trainer  # noqa: F401  (registers configurables)
    from genret_jax.models import model_api
    d_retrieval, d_index = self.artefacts.num_train_examples(cell["fraction"])
    steps = int(np.clip(math.ceil(self.cfg.train_epochs * (d_retrieval + d_index) / self.cfg.batch_size),
                        self.cfg.min_train_steps, self.cfg.max_train_steps))
    model_dir = os.path.join(self.out_dir, "models", cell["model_id"])

    def configure():
      gin_utils.parse_gin([self.cfg.run_gin, cell["rung"]], self._bindings(cell, model_dir, steps))
      return model_api.get_model()

    # Hosts whose run or rung gin files differ would train different models in one collective program. The sweep
    # directory's path may differ between hosts (their mount points).
    model = multihost.agree(configure, lambda _: gin.config_str().replace(self.out_dir, "<output_dir>"),
                            what=f"configuring {cell['model_id']}", differ=f"see another config for "
                            f"{cell['model_id']} than process 0 (its run or rung gin files differ)")
    result = trainer.train()
    if result.preempted:   # evaluating the half-trained model would record it as this cell's result
      raise Preempted(f"model {cell['model_id']}: checkpoint saved at step {result.step} of {steps}; run the same "
                      "sweep command again to resume")
    return model, result, d_retrieval, steps

  # ---- one model ------------------------------------------------------------------------------------------
  def run_cell(self, cell: dict) -> list[dict]:
    from genret_jax.models import accounting
    from genret_jax.retrieval import metrics as metrics_lib
    from genret_jax.retrieval.pipeline import RetrievalConfig, Retriever
    from genret_jax.retrieval.scheme_index import cached_scheme_index
    from genret_jax.scaling import cgl_eval, scoring

    t0 = time.time()
    model, train_result, d, steps = self.train_model(cell)
    stage_s = {"train": time.time() - t0}
    counts = accounting.count_params(model.config)
    lin, lt = self.cfg.task_feature_lengths["inputs"], self.cfg.task_feature_lengths["targets"]
    train_flops = accounting.train_flops_per_example(model.config, lin, lt).total * steps * self.cfg.batch_size
    collection = self.artefacts.collection()
    queries = self.eval_queries()
    vocab = self.artefacts_vocab()
    seqs = self.cgl_sequences()
    # The training mesh (every host's devices), where the params already lie.
    mesh = train_result.mesh
    scored = scoring.PairScorer(model, train_result.params, mesh=mesh).score(seqs.inputs, seqs.targets,
                                                                             input_index=seqs.row_query)
    cgl_res = cgl_eval.reduce_scores(seqs, scored.nll, scored.num_tokens)
    stage_s["cgl"] = time.time() - t0 - sum(stage_s.values())
    queries = [q for q in queries if q.query_id in set(seqs.query_ids)]
    retrieval_cfg = RetrievalConfig(inputs_length=lin, query_prefix=self.artefacts.query_prefix)
    rows_per_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if retrieval_cfg.batch_size % rows_per_batch:
      # Batches split over the mesh's data x fsdp devices: the default 32 does not split over 64 chips, say. Padded
      # rows are masked, so the results do not depend on it.
      retrieval_cfg = dataclasses.replace(
          retrieval_cfg, batch_size=-(-retrieval_cfg.batch_size // rows_per_batch) * rows_per_batch)
    retriever = Retriever(model, train_result.params, self.artefacts.identifier_scheme(), vocab, collection,
                          retrieval_cfg, mesh=mesh,
                          scheme_index=cached_scheme_index(self.artefacts, vocab, model.config.vocab_size))
    qrels = {q.query_id: collection.qrels.get(q.query_id, {}) for q in queries}
    rows, per_query_rows = [], {}
    cgl_pq = cgl_res.per_query(list(seqs.query_ids))
    for beam in cell["beams"]:
      t_beam = time.time()
      res = retriever.retrieve(queries, beam=beam, progress=self.progress and jax.process_index() == 0)
      stage_s[f"beam{beam}"] = time.time() - t_beam
      run = {r.query_id: list(r.doc_ids) for r in res}
      m = metrics_lib.evaluate_run(run, qrels, query_ids=[q.query_id for q in queries],
                                   min_grade=self.artefacts.min_grade)
      agg = m.aggregate
      decode_flops = _decode_flops_per_query(accounting, model.config, lin, retriever.max_decode_len, beam)
      row_id = f"{cell['model_id']}-b{beam:03d}"
      row = {"family": cell["family"], "n_nonembed": counts.non_embedding, "n_total": counts.total,
             "data_fraction": cell["fraction"], "D": d, "train_flops": train_flops, "beam": beam,
             "decode_flops_per_query": decode_flops, "cgl": float(cgl_res.cgl.mean()),
             "ce": float(cgl_res.contrastive_entropy.mean()),
             # trec_eval Recall@k (fraction of the relevant documents retrieved); Hits@k (any relevant in the top
             # k: what NQ-style papers call Recall@k) goes in extra columns.
             **{f"recall@{k}": float(agg.get(f"Recall@{k}", math.nan)) for k in results_lib.RECALL_KS},
             **{f"hits@{k}": float(agg.get(f"Hits@{k}", math.nan)) for k in results_lib.RECALL_KS},
             "mrr@10": float(agg.get("MRR@10", math.nan)), "ndcg@10": float(agg.get("nDCG@10", math.nan)),
             "seed": self.cfg.seed, "config": self.config_path, "wall_s": 0.0, "cell_id": row_id,
             "train_steps": steps, "final_train_loss": train_result.last_loss}
      rows.append(row)
      per_query_rows[row_id] = {"query_ids": list(seqs.query_ids), "cgl": list(cgl_pq["cgl"]),
                                "ce": list(cgl_pq["ce"]),
                                "recall@10": [float(m.per_query.get(q, {}).get("Recall@10", 0.0))
                                              for q in seqs.query_ids],
                                "num_negatives": self.cfg.num_negatives}
    retriever.close()   # its ranking workers (RetrievalConfig.ranking_workers), if any
    wall = time.time() - t0
    logging.info("%s stage seconds: %s", cell["model_id"], {k: round(v, 1) for k, v in stage_s.items()})
    for row in rows:
      row["wall_s"] = wall
      row["stage_s"] = json.dumps({k: round(v, 1) for k, v in stage_s.items()})

    def write():   # every process holds the same numbers; the rows returned everywhere carry process 0's times
      for row_id, pq in per_query_rows.items():
        results_lib.write_per_query(self.out_dir, row_id, pq)
      cell_dir = os.path.join(self.out_dir, results_lib.CELLS_DIR, cell["model_id"])
      filesystem.makedirs(cell_dir)
      atomic_files.write_json(os.path.join(cell_dir, RESULT_JSON),
                              {"cell": cell, "rows": rows, "flops_version": accounting.FLOPS_VERSION,
                               "settings": self.cell_settings()})
      return rows

    return multihost.from_process_0(write, what=f"writing the results of {cell['model_id']}")

  def artefacts_vocab(self):
    import seqio
    return seqio.SentencePieceVocabulary(self.artefacts.vocab_file())

  def cell_settings(self) -> dict:
    """The sweep settings a finished model's rows depend on (the ladder and beam lists only choose cells)."""
    choose = {"rungs", "data_fractions", "fraction_rungs", "fraction_families", "beams", "beam_rungs",
              "default_beam"}
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in choose}))

  def done_rows(self, cell: dict) -> list[dict] | None:
    """The stored rows of a finished model, or None. Rows whose FLOP columns came from an older
    `accounting.FLOPS_VERSION` are kept as they are, and `stale_flops` names their cells. A model finished
    under other settings (or other beams) is refused: its rows would enter the table as this sweep's."""
    from genret_jax.models import accounting
    path = os.path.join(self.out_dir, results_lib.CELLS_DIR, cell["model_id"], RESULT_JSON)
    if not filesystem.exists(path):
      return None
    stored = results_lib.read_json(path)
    settings = self.cell_settings()
    recorded = stored.get("settings", settings)   # result.json files before session 16 recorded none
    differs = sorted(k for k in set(settings) | set(recorded) if recorded.get(k) != settings.get(k))
    if stored.get("cell", cell).get("beams") != cell["beams"]:
      differs.append("beams")
    if differs:
      raise InputError(f"{cell['model_id']} was finished with other settings (differs in {differs}); use another "
                       "output directory, or delete this cell's directory to redo it", path=os.path.dirname(path))
    if stored.get("flops_version", 1) != accounting.FLOPS_VERSION:
      self.stale_flops.append(cell["model_id"])
    return stored["rows"]

  def run(self) -> list[dict]:
    # plan checks the gin files on this host; a failure on one host alone would leave the others waiting.
    cells = multihost.agree(lambda: plan(self.cfg), json.dumps, what="planning the sweep")
    # A typo in eval_split was found after the first model had trained. Hosts whose GENRET_CACHE holds other
    # queries would score other pairs after training.
    multihost.agree(self.eval_queries, lambda qs: json.dumps([[q.query_id, q.text] for q in qs]),
                    what="reading the evaluation queries", differ="see other evaluation queries than process 0: "
                    "give every host the same flags, gin files and GENRET_CACHE")
    all_rows = []
    for i, cell in enumerate(cells):
      # Process 0 decides (the others may not see the sweep directory): a process that trained a model the others
      # skip would wait for them forever.
      rows, self.stale_flops = multihost.from_process_0(lambda: (self.done_rows(cell), self.stale_flops),
                                                        what=f"reading the result of {cell['model_id']}")
      if rows is not None:
        logging.info("[%d/%d] %s: done, skipped", i + 1, len(cells), cell["model_id"])
        print(f"[{i + 1}/{len(cells)}] {cell['model_id']}: already done", flush=True)
      else:
        print(f"[{i + 1}/{len(cells)}] {cell['model_id']}: training + evaluation ...", flush=True)
        rows = self.run_cell(cell)
        best = min(rows, key=lambda r: r["beam"])
        print(f"[{i + 1}/{len(cells)}] {cell['model_id']}: N={best['n_nonembed']:.3g} D={best['D']} "
              f"CGL={best['cgl']:.6f} Recall@10={best['recall@10']:.3f} ({best['wall_s']:.0f}s)", flush=True)
      all_rows.extend(rows)
      multihost.from_process_0(
          lambda: results_lib.write_results(os.path.join(self.out_dir, results_lib.RESULTS_CSV), all_rows),
          what="writing results.csv")
    if self.stale_flops:
      msg = (f"{len(self.stale_flops)} finished model(s) keep train_flops / decode_flops_per_query from an older "
             f"FLOP accounting (T5 counts were low; docs/scaling.md), so the compute axes mix two counts: "
             f"{', '.join(self.stale_flops)}. Delete their directories under "
             f"{os.path.join(self.out_dir, results_lib.CELLS_DIR)} and rerun to redo them.")
      logging.warning(msg)
      print("warning: " + msg, flush=True)
    return all_rows


def _decode_flops_per_query(accounting, config, inputs_length: int, max_len: int, beam: int) -> float:
  """Encoder/prefill once per query, then `beam` hypotheses per step for `max_len` steps (upper bound: every
  beam runs to max length)."""
  init = accounting.decode_init_flops(config, inputs_length).total
  steps = sum(accounting.decode_step_flops(config, t + 1, inputs_length).total for t in range(max_len))
  return float(init + beam * steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from genret_jax.training import distributed
  gin_utils.add_gin_arguments(parser)
  distributed.add_arguments(parser)
  parser.add_argument("--output_dir", required=True, help="Sweep directory (created; a rerun resumes).")
  parser.add_argument("--report", action="store_true", help="Run `genret report` on the sweep at the end.")
  parser.add_argument("--bootstrap", type=int, default=200, help="Bootstrap resamples for the report.")


def read_config(args, gin_files: Sequence[str], flags: Mapping) -> tuple[SweepConfig, str]:
  """(the sweep config, the absolute output directory) from the command's gin files and flags, on every process
  of a multi-host job: all of them, or none, are given the same sweep (`flags`: the command's other flags that
  change what it does). Call `distributed.initialize_from_args` first."""

  def parse():
    gin_utils.parse_gin(gin_files, args.gin_bindings, args.gin_search_paths)
    return SweepConfig()

  # First, before any step that is a collective: processes given different sweeps would train different models,
  # or skip different ones, and wait for each other forever.
  cfg = multihost.agree(
      parse, lambda c: json.dumps({"sweep": dataclasses.asdict(c), "gin": gin.config_str(),
                                   "output_dir": args.output_dir, **flags}, sort_keys=True, default=str),
      what="reading the sweep config", differ="see another sweep than process 0 (flags or gin files differ): give "
      "every host the same command")
  return cfg, filesystem.abspath(args.output_dir)


def report_on_process_0(out_dir: str, bootstrap: int) -> str:
  """`genret report` on the sweep directory, by process 0 (the others may not see it); its path, on every
  process."""
  from genret_jax.scaling import report
  return multihost.from_process_0(
      lambda: report.make_report(out_dir, report.ReportConfig(bootstrap_resamples=bootstrap)),
      what="writing the report")


def run(args) -> int:
  logging.basicConfig(level=logging.WARNING)
  check_int(args.bootstrap, "--bootstrap", low=0)   # before the sweep, not after it
  from genret_jax.training import distributed
  # Before anything touches the backend: otherwise every host ran the whole sweep alone, as process 0 of 1.
  distributed.initialize_from_args(args)
  cfg, out = read_config(args, args.gin_file, {"report": args.report, "bootstrap": args.bootstrap})

  def write_gin():
    filesystem.makedirs(out)
    atomic_files.write_text(os.path.join(out, "sweep.gin"), gin.config_str())

  multihost.from_process_0(write_gin, what="writing sweep.gin")
  run_sweep(cfg, out, config_path=",".join(args.gin_file))
  if args.report:
    print(f"report: {report_on_process_0(out, args.bootstrap)}")
  return 0


def run_sweep(cfg: SweepConfig, out_dir: str, config_path: str = "") -> list[dict]:
  # Each cell reparses gin for its model; keep the sweep's own config object fixed across them.
  sweep = Sweep(cfg, out_dir, config_path)
  return sweep.run()
