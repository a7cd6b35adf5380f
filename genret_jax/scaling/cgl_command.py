"""`genret cgl`: contrastive generation loss of a checkpoint (gin-configured, t5x eval conventions).

  genret cgl --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=\"/tmp/run\" [--gin.SPLIT=\"validation\"]

The model is rebuilt from `<CHECKPOINT_PATH>/model.gin` (written by `genret train` / `genret convert-hf`) or from
`--gin.MODEL_GIN=\"models/t5_1_1/tiny.gin\"`; the user's gin files and bindings are parsed after it, so they
override it. The task (collection, identifier scheme, vocabulary, seed, splits) is the training run's
MIXTURE_OR_TASK_NAME unless overridden. Output: one JSON file (OUTPUT, default `<CHECKPOINT_PATH>/cgl_<split>.json`)
with mean CGL and contrastive entropy, 95% bootstrap CIs over queries and the per-query values; the negatives are
saved next to it (or read from NEGATIVES_PATH when that file exists, so every model of a sweep shares them).

On several hosts it takes `genret train`'s flags (--coordinator_address, --process_count, --process_index or
--multiprocess): the scoring batches are sharded over the mesh of every host's devices, every process gets every
pair's score back, and process 0 alone writes the output and the negatives (the others use its negatives).
Processes given different jobs stop with one error instead of waiting for each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Mapping

import gin
import jax

from genret_jax import atomic_files, filesystem, gin_utils, multihost
from genret_jax.errors import InputError, check_int
from genret_jax.scaling import cgl, cgl_eval, scoring

logger = logging.getLogger(__name__)


def _retrieval_task(name: str):
  """The retrieval task behind a task or mixture name (a mixture's `..._retrieval[_fXXX]` member)."""
  import seqio
  try:
    obj = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise InputError(f"unknown seqio task or mixture {name!r} (is it registered by `import tasks`?)",
                     key="MIXTURE_OR_TASK_NAME") from e
  if isinstance(obj, seqio.Mixture):
    members = [t for t in obj.tasks if "_retrieval" in t.name]
    if len(members) != 1:
      raise InputError(f"mixture {name!r} has {len(members)} retrieval tasks; name one task instead",
                       key="MIXTURE_OR_TASK_NAME")
    return members[0]
  return obj


def _check_inputs_match_task(task, split: str, lengths: Mapping[str, int], query_prefix: str, vocab,
                             queries_by_id) -> int:
  """Compares our tokenised inputs with the seqio task's for a few examples; returns how many were checked."""
  checked = 0
  try:
    ds = task.get_dataset(dict(lengths), split=split, shuffle=False, use_cached=False, num_epochs=1)
  except Exception as e:  # pragma: no cover - a task without that split
    raise InputError(f"task {task.name!r} has no split {split!r}: {e}", key="SPLIT") from e
  for ex in ds.take(8).as_numpy_iterator():
    qid = ex["query_id"].decode("utf-8")
    if qid not in queries_by_id:
      continue
    ours = cgl_eval.tokenize(vocab, query_prefix + queries_by_id[qid].text, lengths.get("inputs"))
    if [int(t) for t in ex["inputs"]] != ours:
      raise InputError(f"query {qid!r}: the task's tokenised input differs from ours; set QUERY_PREFIX to the "
                       f"task's query_prefix", key="QUERY_PREFIX")
    checked += 1
  return checked


@gin.configurable(module="genret")
def cgl_eval_run(*, checkpoint_path: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
                 split: str = "test", task_feature_lengths: Mapping[str, int] | None = None,
                 num_negatives: int = cgl.DEFAULT_NUM_NEGATIVES, negatives_seed: int = 0,
                 negatives_path: str | None = None, allow_fewer_negatives: bool = False,
                 batch_size: int = scoring.DEFAULT_BATCH_SIZE, inputs_per_batch: int | None = None,
                 share_inputs: bool = True, averaging: str = "token", query_prefix: str = "",
                 max_queries: int | None = None, output_path: str | None = None,
                 bootstrap_resamples: int = 1000, bootstrap_seed: int = 0,
                 mesh_data: int = -1, mesh_fsdp: int = 1, mesh_model: int = 1,
                 progress: bool = True) -> dict:
  """Loads the checkpoint, scores the split and writes the JSON (process 0 of several); returns it."""
  job = {name: value for name, value in locals().items() if name != "progress"}
  import tasks  # noqa: F401  (registers the tasks)
  from genret_jax.models import model_api, params_io, partitioning

  t0 = time.perf_counter()
  # First, before anything that is a collective or can fail on one host alone: processes given different flags,
  # gin files or checkpoints would otherwise score different batches and wait for each other forever.
  multihost.agree(
      lambda: None,
      lambda _: json.dumps({"job": job, "gin": gin.config_str(),
                            "params": params_io.params_fingerprint(checkpoint_path)}, sort_keys=True, default=str),
      what="describing the job", differ="see another job than process 0 (configuration or checkpoint differ): give "
      "every host the same flags, gin files and checkpoint")
  # Checked before any scoring (a bad averaging mode was found after every batch had been scored).
  # (a string NEGATIVES_SEED failed inside int() with a traceback; -1 is a mesh axis's "all remaining devices").
  for macro, value, low in (("NUM_NEGATIVES", num_negatives, 1), ("BATCH_SIZE", batch_size, 1),
                            ("NEGATIVES_SEED", negatives_seed, 0),
                            ("genret.cgl_eval_run.bootstrap_resamples", bootstrap_resamples, 0),
                            ("genret.cgl_eval_run.bootstrap_seed", bootstrap_seed, 0),
                            ("genret.cgl_eval_run.mesh_data", mesh_data, -1),
                            ("genret.cgl_eval_run.mesh_fsdp", mesh_fsdp, -1),
                            ("genret.cgl_eval_run.mesh_model", mesh_model, -1)):
    check_int(value, macro, low)
  for name, value in (("max_queries", max_queries), ("inputs_per_batch", inputs_per_batch)):
    if value is not None:
      check_int(value, f"genret.cgl_eval_run.{name}", 1)
  if averaging not in cgl.AVERAGING_MODES:
    raise InputError(f"unknown averaging {averaging!r}; choose from {sorted(cgl.AVERAGING_MODES)}",
                     key="genret.cgl_eval_run.averaging")
  lengths = dict(task_feature_lengths or {})

  def read_task():   # the task's artefacts, from this host's GENRET_CACHE
    task = _retrieval_task(mixture_or_task_name)
    artefacts = tasks.artefacts_for(task.name)
    splits = artefacts.query_splits()
    if split not in splits:
      raise InputError(f"split {split!r} has no judged queries; available: {sorted(splits)}", key="SPLIT")
    queries = list(splits[split])
    if max_queries is not None:
      queries = queries[:max_queries]
    vocab = task.output_features["targets"].vocabulary
    checked = _check_inputs_match_task(task, split, lengths, query_prefix, vocab,
                                       {q.query_id: q for q in queries})
    return task, artefacts, queries, vocab, checked

  task, artefacts, queries, vocab, checked = multihost.agree(read_task, None, what="reading the task")
  collection = artefacts.collection()
  scheme = artefacts.identifier_scheme()

  try:
    model = model_api.get_model()
  except (ValueError, TypeError, RuntimeError) as e:
    raise InputError(f"the gin config does not describe a model (models.get_model.model / MODEL): {e}",
                     key="MODEL_GIN") from e
  mesh = partitioning.make_mesh(mesh_data, mesh_fsdp, mesh_model)
  params_io.check_vocabulary(checkpoint_path, vocab)
  params = params_io.restore_params(checkpoint_path, params_io.abstract_with_shardings(model, mesh))

  output_path = output_path or os.path.join(checkpoint_path, f"cgl_{split}.json")
  negatives_path = negatives_path or os.path.join(
      os.path.dirname(filesystem.abspath(output_path)), f"negatives_{split}_n{num_negatives}_s{negatives_seed}.npz")

  def show(done, total):
    if progress and jax.process_index() == 0 and (done == total or done % max(1, total // 20) == 0):
      print(f"\rscoring batch {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

  ev = cgl_eval.evaluate_cgl(
      model, params, collection, scheme, vocab, queries, target_seed=artefacts.seed, num_negatives=num_negatives,
      negatives_seed=negatives_seed, negatives_path=negatives_path, input_length=lengths.get("inputs"),
      target_length=lengths.get("targets"), query_prefix=query_prefix, min_grade=artefacts.min_grade,
      averaging=averaging, mesh=mesh, batch_size=batch_size, inputs_per_batch=inputs_per_batch,
      share_inputs=share_inputs, allow_fewer_negatives=allow_fewer_negatives, progress=show,
      targets_cache_dir=artefacts.directory())
  out = cgl_eval.evaluation_json(
      ev, bootstrap_resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed,
      extra={"checkpoint_path": filesystem.abspath(checkpoint_path), "task": task.name,
             "collection": collection.name, "scheme": scheme.name, "split": split,
             "averaging": averaging, "task_feature_lengths": lengths, "inputs_checked_against_task": checked,
             "negatives_path": filesystem.abspath(negatives_path), "model_family": model.family,
             "num_devices": int(mesh.devices.size), "num_processes": jax.process_count(), "wall_seconds": None})
  out["wall_seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:   # every process holds the same numbers; OUTPUT need be writable by process 0 only
    atomic_files.write_json(output_path, out, indent=1)
  else:
    out["written_by_process"] = 0
  out["output_path"] = filesystem.abspath(output_path)
  return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from genret_jax.training import distributed
  gin_utils.add_gin_arguments(parser)
  distributed.add_arguments(parser)


def _model_gin_file(args) -> str:
  """First pass over the user's config: where the model config lives."""
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths, finalize=False)
  ckpt = gin_utils.config_value("CHECKPOINT_PATH")
  if not isinstance(ckpt, str) or not ckpt:
    raise InputError("CHECKPOINT_PATH is required (--gin.CHECKPOINT_PATH=\\\"/path/to/run\\\")",
                     key="CHECKPOINT_PATH")
  if not filesystem.isdir(ckpt):
    raise InputError("CHECKPOINT_PATH: no such directory", path=ckpt)
  model_gin = gin_utils.config_value("MODEL_GIN")
  if isinstance(model_gin, str) and model_gin:
    return model_gin
  path = os.path.join(ckpt, "model.gin")
  if not filesystem.exists(path):
    raise InputError("no model.gin next to the params; pass the model config with --gin.MODEL_GIN=...",
                     path=path)
  return path


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  from genret_jax.training import distributed
  # Before anything touches the backend: otherwise every host scored the whole split alone and wrote the output.
  distributed.initialize_from_args(args)
  from genret_jax.models import model_api  # noqa: F401  (registers the model configurables)
  model_gin = _model_gin_file(args)
  gin_utils.parse_gin([model_gin, *args.gin_file], args.gin_bindings, args.gin_search_paths)
  if gin_utils.config_value("MIXTURE_OR_TASK_NAME") is None:
    raise InputError("MIXTURE_OR_TASK_NAME is not set by the model config; pass --gin.MIXTURE_OR_TASK_NAME=...",
                     key="MIXTURE_OR_TASK_NAME")
  out = cgl_eval_run()
  s = out["summary"]
  if "written_by_process" in out:
    print(f"process {jax.process_index()} of {jax.process_count()}: scored {out['num_sequences']} sequences "
          f"(CGL {s['cgl']:.6f}); process {out['written_by_process']} wrote {out['output_path']}")
    return 0
  print(f"CGL {s['cgl']:.6f} [{s['cgl_ci'][0]:.6f}, {s['cgl_ci'][1]:.6f}]  CE {s['ce']:.4f} "
        f"[{s['ce_ci'][0]:.4f}, {s['ce_ci'][1]:.4f}]  (chance {s['chance_cgl']:.7f} / {s['chance_ce']:.4f}; "
        f"{s['num_queries']} queries x {s['num_negatives']} negatives, {out['num_sequences']} sequences); "
        f"wrote {out['output_path']}")
  return 0
