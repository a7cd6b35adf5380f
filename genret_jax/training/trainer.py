"""The trainer: jit-compiled, sharded train step over the (data, fsdp, model) mesh, orbax checkpoints with exact
resume, optional LoRA, gradient accumulation, TensorBoard metrics, NaN guard.

Resume is exact: the train state (params, optimizer state, step) is checkpointed with the number of batches the
data stream has produced; dropout RNGs are `fold_in(seed, step)`; the seqio stream is deterministic given its seed,
and a restart restores each process's saved tf.data iterator (or, without one, skips the consumed batches). A killed
and restarted run therefore ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import time
from typing import Any, Callable, Mapping

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from genret_jax import atomic_files, filesystem, gin_utils, multihost
from genret_jax.errors import InputError, check_int
from genret_jax.models import params_io, partitioning
from genret_jax.training import checkpoints as ckpt_lib
from genret_jax.training import lora as lora_lib
from genret_jax.training import optimizers

Params = Any


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Params          # the trainable tree: full params, or LoRA adapters
  opt_state: Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  model: int = 1

  def build(self) -> jax.sharding.Mesh:
    return partitioning.make_mesh(self.data, self.fsdp, self.model)


def _batch_specs(batch: Mapping[str, np.ndarray], mesh) -> dict[str, NamedSharding]:
  return {k: partitioning.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def _global_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding] | None, batch_size: int):
  """Multi-host: each process holds the rows of its devices (its seqio shard, `_data_shard`); jit needs one global
  array per feature. The global shape is given: processes that share rows (a `model` axis across hosts) each
  hold the same block, so it is not the local shape times the process count."""
  if shardings is None or jax.process_count() == 1:
    return batch
  return {k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size,) + v.shape[1:])
          for k, v in batch.items()}


def _data_shard(batch_shardings: Mapping[str, NamedSharding] | None, batch_size: int) -> tuple[int, int]:
  """(shard index, shard count) of the seqio stream this process reads: the block of rows its devices hold."""
  if batch_shardings is None:
    return 0, 1
  return partitioning.process_batch_slice(next(iter(batch_shardings.values())).mesh, batch_size)


def _split_microbatches(batch, n: int):
  """[n, B / n, ...] with microbatch i = rows i, i + n, i + 2n, ...: strided, so every device's block of the batch
  holds B / n / devices rows of each microbatch and the accumulation loop moves no rows between devices
  (contiguous blocks put each microbatch on a fraction of the devices: all-gathers in every iteration)."""
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def _all_finite(tree) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(model, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                    lora_cfg: lora_lib.LoraConfig | None = None, dropout: bool = True) -> Callable:
  """(state, batch, frozen_params, base_rng) -> (state, metrics). Non-finite steps leave the state unchanged."""

  def loss_of(trainable, frozen, batch, rng):
    params = lora_lib.merge(frozen, trainable, lora_cfg) if lora_cfg is not None else trainable
    loss, metrics = model.loss_fn(params, batch, rng if dropout else None)
    return loss * metrics["num_tokens"], metrics   # token-weighted, so accumulation equals one big batch

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step_fn(state: TrainState, batch, frozen, base_rng):
    rng = jax.random.fold_in(base_rng, state.step)
    if grad_accum_steps == 1:
      (wloss, metrics), grads = grad_fn(state.params, frozen, batch, rng)
      ntok, correct = metrics["num_tokens"], metrics["accuracy"] * metrics["num_tokens"]
      dropped = metrics["dropped_tokens"]
    else:
      micro = _split_microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        i, mb = xs
        (wl, m), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_n, acc_c, acc_d = carry
        return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc_g, g), acc_l + wl, acc_n + m["num_tokens"],
                acc_c + m["accuracy"] * m["num_tokens"], acc_d + m["dropped_tokens"]), None

      # Sums of many microbatch gradients in float32 even for bfloat16 params (bf16 keeps 8 bits of mantissa:
      # a 64-way sum would lose the small ones); the optimizer gets them back in the params' dtype.
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), state.params)
      (grads, wloss, ntok, correct, dropped), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0, 0.0, 0.0), (jnp.arange(grad_accum_steps), micro))
    denom = jnp.maximum(ntok, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    loss = wloss / denom
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Guard the loss, the gradients, the updated params and optimizer state: a step that would poison the state is
    # not applied (an Adam second moment overflowing to inf leaves the params finite but that parameter frozen).
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_params) & _all_finite(new_opt)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state))
    metrics = {"loss": loss, "accuracy": correct / denom, "num_tokens": ntok, "finite": finite,
               "grad_norm": optax.global_norm(grads), "dropped_tokens": dropped}
    return new_state, metrics

  return step_fn


def check_feature_lengths(task_feature_lengths) -> None:
  if not isinstance(task_feature_lengths, Mapping):
    raise InputError(f"must map feature names to lengths, got {task_feature_lengths!r}", key="TASK_FEATURE_LENGTHS")
  for feature, length in task_feature_lengths.items():
    check_int(length, f"TASK_FEATURE_LENGTHS[{feature!r}]")
  missing = {"inputs", "targets"} - set(task_feature_lengths)
  if missing:
    raise InputError(f"needs lengths for {sorted(missing)} (got {dict(task_feature_lengths)})",
                     key="TASK_FEATURE_LENGTHS")


def train_optimizer(optimizer: optax.GradientTransformation | None, learning_rate,
                    train_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """`train`'s (optimizer, learning-rate schedule): the optimizer given, else `make_optimizer` over the rate given
  or the default schedule over `train_steps`."""
  schedule = learning_rate if learning_rate is not None else optimizers.make_schedule(total_steps=train_steps)
  return (optimizer if optimizer is not None else optimizers.make_optimizer(learning_rate=schedule)), schedule


def check_batch_split(batch_size: int, grad_accum_steps: int, mesh: jax.sharding.Mesh) -> None:
  """Every microbatch's rows divide over the mesh's batch devices (data x fsdp)."""
  data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % (grad_accum_steps * data_devices):
    raise InputError(f"BATCH_SIZE {batch_size} must split into {grad_accum_steps} microbatches whose rows divide "
                     f"evenly over the mesh's data x fsdp = {data_devices} devices", key="train.grad_accum_steps")


@dataclasses.dataclass(frozen=True)
class StateAndStep:
  """The compiled state initialiser, the train state's shardings and abstract value, and the jitted train step."""

  init: Any                 # compiled: trainable params -> TrainState (donates its input)
  state_shardings: Any      # TrainState of shardings
  abstract_state: Any       # TrainState of ShapeDtypeStructs with those shardings (a restore target)
  step: Callable            # jitted (state, batch, frozen, base_rng) -> (state, metrics)


def param_layouts(params) -> dict[tuple, tuple[tuple[int, ...], Any]]:
  """tree path -> (shape, sharding) of every parameter (arrays, or ShapeDtypeStructs carrying a sharding)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(path): (tuple(leaf.shape), leaf.sharding) for path, leaf in flat
          if getattr(leaf, "sharding", None) is not None}


def shard_like_params(opt_state, layouts: Mapping[tuple, tuple[tuple[int, ...], Any]]):
  """`opt_state` with every leaf shaped like its parameter (Adam's moments, momentum, Adafactor's unfactored
  second moment) constrained to that parameter's sharding (`layouts`: `param_layouts(params)`); a leaf is its
  parameter's when its tree path ends with the parameter's path (optax nests the parameter tree under its fields).

  Propagation alone left them replicated: optax builds them with `jnp.zeros(shape)`, which carries no sharding,
  and XLA gave every device the whole array (T5 XL with Adafactor, whose attention kernels [layers, d, heads, 64]
  have no second dimension >= 128 to factor: 4.5 GiB per device on any mesh; `genret train-compile`, session 26).
  """

  def one(path, leaf):
    for i in range(len(path)):
      hit = layouts.get(tuple(path[i:]))
      if hit is not None:
        shape, sharding = hit
        return jax.lax.with_sharding_constraint(leaf, sharding) if tuple(leaf.shape) == shape else leaf
    return leaf

  return jax.tree_util.tree_map_with_path(one, opt_state)


def jit_state_and_step(model, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, trainable, frozen,
                       batch_shardings: Mapping[str, NamedSharding], grad_accum_steps: int = 1,
                       lora_cfg: lora_lib.LoraConfig | None = None, dropout: bool = True) -> StateAndStep:
  """What `train` runs, built from `trainable` params (arrays or ShapeDtypeStructs with shardings; `genret
  train-compile` passes the latter for devices it does not have). Call under `jax.set_mesh(mesh)`."""

  layouts = param_layouts(trainable)

  def init_state(params):
    opt_state = shard_like_params(tx.init(params), layouts)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

  # One compilation gives both the state shardings (params keep their logical shardings, the optimizer state's
  # parameter-shaped leaves take their parameter's, the rest follows by propagation) and the initialiser.
  init_compiled = jax.jit(init_state, donate_argnums=0).lower(trainable).compile()
  state_sh = init_compiled.output_shardings
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(init_state, trainable), state_sh)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
  rep = NamedSharding(mesh, P())
  step_fn = jax.jit(make_train_step(model, tx, grad_accum_steps, lora_cfg, dropout),
                    in_shardings=(state_sh, dict(batch_shardings), frozen_sh, rep),
                    out_shardings=(state_sh, rep), donate_argnums=(0,))
  return StateAndStep(init=init_compiled, state_shardings=state_sh, abstract_state=abstract, step=step_fn)


def make_eval_step(model, lora_cfg=None) -> Callable:
  def eval_fn(trainable, frozen, batch):
    params = lora_lib.merge(frozen, trainable, lora_cfg) if lora_cfg is not None else trainable
    _, m = model.loss_fn(params, batch, None)
    return {"loss_sum": m["cross_ent_loss"] * m["num_tokens"], "num_tokens": m["num_tokens"],
            "correct": m["accuracy"] * m["num_tokens"], "dropped_tokens": m["dropped_tokens"]}
  return eval_fn


@dataclasses.dataclass
class TrainResult:
  step: int
  last_loss: float
  losses: list[float]
  eval_loss: float | None
  params: Params            # merged full params (LoRA merged in)
  model_dir: str
  tokens_per_s: float
  resumed_from: int | None
  preempted: bool = False   # stopped by a preemption notice (SIGTERM) after checkpointing; rerun to resume
  mesh: jax.sharding.Mesh | None = None   # the mesh `params` lie on (a sweep evaluates the model on it)


class _StepProfiler:
  """A JAX profiler trace of steps [start, start + num_steps) (what MaxText's `profiler` options do): compile
  time and the first steps' warm-up stay out of the window, which a whole-run trace buries them in."""

  def __init__(self, model_dir: str, start: int | None, num_steps: int, all_processes: bool, first_step: int):
    self.directory = os.path.join(model_dir, "profile")
    self.start, self.end, self.active = start, (start or 0) + num_steps - 1, False
    if start is not None and start <= first_step:
      logging.warning("train.profile_start_step %d: the run resumes after it (step %d); nothing is profiled",
                      start, first_step)
    if start is not None and not (all_processes or jax.process_index() == 0):
      self.start = None

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int) -> None:
    if self.active and step >= self.end:
      self.close()
      logging.info("profile of steps %d-%d written to %s", self.start, step, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class _PreemptionNotice:
  """Whether the job was told to stop (SIGTERM: Cloud TPU spot/preemptible VMs, SLURM, Kubernetes), checked once a
  step. On several processes JAX's preemption service catches the signal and agrees a step at which every host
  saves (`reached_preemption_sync_point`, as t5x; the hosts may get the signal at different steps); on one process
  our own handler sets a flag for the next step boundary. Without it a preempted run lost every step since its
  last periodic checkpoint."""

  def __init__(self):
    import signal
    import threading
    self._multi = jax.distributed.is_initialized()
    self._signal, self._old, self.received = signal, None, False
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    if self.received:   # a second notice: stop now, as without the handler
      self.close()
      self._signal.raise_signal(signum)
    self.received = True

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self.received
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:   # the preemption service disabled (jax_enable_preemption_service)
      return False

  def close(self) -> None:
    if self._old is not None:
      self._signal.signal(self._signal.SIGTERM, self._old)
      self._old = None


# Dense bf16 peak FLOP/s per chip, by `device_kind`. TPUs report exact names ("TPU v5" is a v5p, "TPU v5 lite" a
# v5e, "TPU v6 lite" a v6e); GPUs report the marketing name ("NVIDIA H100 80GB HBM3"), matched by model number
# as a whole word so that "L40S" is not an "L4" and "GH200" is an "H200".
_TPU_PEAK_FLOPS = {"tpu v4": 275e12, "tpu v4 lite": 138e12, "tpu v5": 459e12, "tpu v5p": 459e12,
                   "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
                   "tpu7x": 2307e12}
_GPU_PEAK_FLOPS = {"b200": 2250e12, "h200": 989e12, "gh200": 989e12, "h100": 989e12, "h800": 989e12,
                   "a100": 312e12, "a800": 312e12, "l40s": 362e12, "l4": 121e12, "a10g": 70e12, "v100": 125e12}


def peak_flops_for(device_kind: str) -> float | None:
  """Per-chip peak FLOP/s of an accelerator named by `device_kind`; None when it is not in the tables."""
  kind = device_kind.lower().strip()
  if kind in _TPU_PEAK_FLOPS:
    return _TPU_PEAK_FLOPS[kind]
  for word in re.findall(r"[a-z0-9]+", kind):
    if word in _GPU_PEAK_FLOPS:
      return _GPU_PEAK_FLOPS[word]
  return None


@functools.cache
def _device_peak_flops() -> float:
  """Per-device peak FLOP/s for MFU: known accelerators by name; CPU measured with a short matmul; 0 (MFU not
  reported) for an accelerator the tables do not know."""
  device = jax.devices()[0]
  peak = peak_flops_for(device.device_kind)
  if peak is not None:
    return peak
  if device.platform != "cpu":
    logging.warning("no peak FLOP/s known for device kind %r: MFU is not reported", device.device_kind)
    return 0.0
  n = 512
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  reps = 20
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def initial_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(params init rng, LoRA init rng) of a run with this seed: what `train` starts from, so that an
  "untrained" baseline can be exactly a run's starting point (`initial_params`)."""
  init_rng, lora_rng = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
  return init_rng, lora_rng


def initial_params(model, seed: int, mesh: jax.sharding.Mesh, batch_shapes) -> Params:
  """The parameters `train(seed=seed)` starts from when it has no checkpoint to initialise from."""
  return model.init_sharded(initial_rngs(seed)[0], mesh, batch_shapes)


@gin.configurable
def train(*,
          model=gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          model_dir: str = gin.REQUIRED,
          batch_size: int = 32,
          seed: int = 0,
          learning_rate: optax.Schedule | float | None = None,
          optimizer: optax.GradientTransformation | None = None,
          mesh_config: MeshConfig | None = None,
          grad_accum_steps: int = 1,
          lora: lora_lib.LoraConfig | None = None,
          initial_checkpoint_path: str | None = None,
          use_cached_tasks: bool = False,
          pack: bool = False,
          eval_split: str | None = "validation",
          eval_every: int = 0,
          eval_batches: int = 4,
          checkpoint_every: int = 100,
          keep_checkpoints: int = 3,
          async_checkpointing: bool = False,
          log_every: int = 10,
          dropout: bool = True,
          progress: bool = True,
          write_config: bool = True,
          checkpoint_data_position: bool = True,
          profile_start_step: int | None = None,
          profile_steps: int = 5,
          profile_all_processes: bool = False,
          stop_after_steps: int | None = None) -> TrainResult:
  """Trains `model` on a seqio task/mixture; resumes from MODEL_DIR/checkpoints when present.

  `checkpoint_data_position` saves each process's tf.data iterator with every checkpoint
  (MODEL_DIR/checkpoints_data/<step>/shard_<k>-of-<n>.process_<i>), so a restart restores the input pipeline
  instead of re-running it over every consumed batch; without it (or when that save is missing) the restart skips
  them, with the same result. `profile_start_step` traces steps [start, start + profile_steps) with the JAX
  profiler into MODEL_DIR/profile (TensorBoard's profile plugin; on process 0 unless `profile_all_processes`:
  MaxText's profiler options). `stop_after_steps` stops the process early (as if killed) — used by the resume
  tests.
  """
  gin_utils.check_required(MODEL=model, MODEL_DIR=model_dir, MIXTURE_OR_TASK_NAME=mixture_or_task_name,
                           TASK_FEATURE_LENGTHS=task_feature_lengths, TRAIN_STEPS=train_steps,
                           INITIAL_CHECKPOINT_PATH=initial_checkpoint_path)
  for macro, value, low in (("TRAIN_STEPS", train_steps, 1), ("BATCH_SIZE", batch_size, 1),
                            ("train.grad_accum_steps", grad_accum_steps, 1), ("train.eval_every", eval_every, 0),
                            ("train.eval_batches", eval_batches, 1), ("train.checkpoint_every", checkpoint_every, 1),
                            ("train.keep_checkpoints", keep_checkpoints, 1), ("train.log_every", log_every, 1),
                            ("train.seed", seed, 0), ("train.profile_steps", profile_steps, 1)):
    check_int(value, macro, low)
  if profile_start_step is not None:
    check_int(profile_start_step, "train.profile_start_step")
  check_feature_lengths(task_feature_lengths)
  if batch_size % grad_accum_steps:
    raise InputError(f"BATCH_SIZE {batch_size} not divisible by grad_accum_steps {grad_accum_steps}",
                     key="train.grad_accum_steps")
  # seqio/TensorFlow load only when a run needs data: the train step itself is importable without them
  # (benchmarks on accelerator hosts that have no TF).
  from genret_jax.training import data as data_lib
  # The task is checked before MODEL_DIR is made or a checkpoint manager opened: a misspelt name leaves nothing.
  data_lib.check_model_vocabulary(mixture_or_task_name, model.config.vocab_size)
  mesh = (mesh_config or MeshConfig()).build()
  shard_index, num_shards = partitioning.process_batch_slice(mesh, batch_size)
  check_batch_split(batch_size, grad_accum_steps, mesh)
  tx, schedule = train_optimizer(optimizer, learning_rate, train_steps)
  model_dir = filesystem.abspath(model_dir)   # gs://... stays a URL (os.makedirs made a local ./gs:/... of it)
  filesystem.makedirs(model_dir)
  multihost.check_shared_directory(model_dir, key="MODEL_DIR")
  converter = data_lib.feature_converter_for(model.family, pack=pack)
  # Dropout keys fold the step into their own stream: folded into key(seed) itself, step 1's key was the one
  # `initial_rngs` splits for the init keys.
  base_rng = jax.random.fold_in(jax.random.key(seed), 2)
  _, lora_rng = initial_rngs(seed)

  ckpt = ckpt_lib.Checkpointer(os.path.join(model_dir, "checkpoints"), max_to_keep=keep_checkpoints,
                               async_save=async_checkpointing)
  latest = ckpt.latest_step()
  skip = 0
  # What the data stream and the loss depend on: a resumed run must have the same (TRAIN_STEPS may grow).
  # The model, its LoRA and the frozen base too: orbax's shape error on another model's checkpoint was a
  # 700-line traceback, and a different base under the same adapters resumed silently.
  run_identity = {"seed": seed, "batch_size": batch_size, "mixture_or_task_name": mixture_or_task_name,
                  "task_feature_lengths": dict(task_feature_lengths), "pack": pack,
                  "model": {"family": model.family, **dataclasses.asdict(model.config)},
                  "lora": dataclasses.asdict(lora) if lora is not None else None,
                  "initial_checkpoint": (params_io.params_fingerprint(initial_checkpoint_path)
                                         if initial_checkpoint_path else None)}
  resumed_meta: dict = {}
  if latest is not None:
    resumed_meta = ckpt.restore_meta(latest)
    _check_resume(resumed_meta, run_identity, latest, train_steps, model_dir)
    skip = int(resumed_meta["batches_consumed"])
  # Written once the run is accepted: a refused resume leaves the checkpointed run's config in place.
  if write_config and jax.process_index() == 0:
    atomic_files.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())

  if jax.process_index() == 0:
    _report_truncation(data_lib.truncation_counts(mixture_or_task_name, task_feature_lengths,
                                                  use_cached=use_cached_tasks), task_feature_lengths, model_dir)
  train_data = functools.partial(data_lib.get_dataset, mixture_or_task_name, task_feature_lengths, "train",
                                 batch_size, converter, seed=seed, shuffle=True, num_epochs=None,
                                 use_cached=use_cached_tasks, shard_index=shard_index, num_shards=num_shards)
  # The shard layout is in the name: after a restart on another host count a process finds no position for its new
  # shard (and skips) instead of restoring another shard's iterator.
  data_dir = lambda step: os.path.join(model_dir, "checkpoints_data", str(step), _data_position_name(shard_index,
                                                                                                     num_shards))
  batches = data_lib.ResumableBatches(train_data())
  if skip:
    if checkpoint_data_position and batches.restore(data_dir(latest)):
      logging.info("input pipeline restored at batch %d from %s", skip, data_dir(latest))
    else:
      batches = data_lib.ResumableBatches(train_data(skip_batches=skip))
  first = next(batches)
  batch_shapes = {k: (1,) + v.shape[1:] for k, v in first.items()}

  with jax.set_mesh(mesh):
    if latest is not None and lora is None:
      # The checkpoint holds the params: their shapes and shardings are all a restore needs.
      base_params = params_io.abstract_with_shardings(model, mesh, batch_shapes)
    elif initial_checkpoint_path:
      base_params = load_params(initial_checkpoint_path, model, mesh, batch_shapes)
    else:
      base_params = initial_params(model, seed, mesh, batch_shapes)

    if lora is not None:
      trainable0 = lora_lib.init_lora(base_params, lora, lora_rng)
      frozen = base_params
    else:
      trainable0, frozen = base_params, None
    del base_params   # full training keeps one copy of the params: the train state's

    batch_sh = _batch_specs(first, mesh)
    steps = jit_state_and_step(model, tx, mesh, trainable0, frozen, batch_sh, grad_accum_steps, lora, dropout)
    state_sh = steps.state_shardings
    resumed_from = None
    if latest is not None:
      state, meta = ckpt.restore(latest, steps.abstract_state)
      resumed_from = latest
      logging.info("resumed from step %d (%d batches consumed)", latest, skip)
    else:
      state = steps.init(trainable0)
      del trainable0

    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
    rep = NamedSharding(mesh, P())
    step_fn = steps.step
    eval_fn = jax.jit(make_eval_step(model, lora), in_shardings=(state_sh.params, frozen_sh, batch_sh),
                      out_shardings=rep)

    writer = _make_writer(model_dir)
    flops_per_token = _train_flops_per_token(model, first)
    peak = _device_peak_flops() * jax.device_count()
    losses: list[float] = []
    start_step = int(state.step)
    eval_loss = None
    pbar = _progress(start_step, train_steps, progress)
    tokens_window, t_window = 0.0, time.perf_counter()
    step = start_step
    batch = first
    consumed = skip
    last_loss = float(resumed_meta.get("last_loss", "nan"))   # a finished run restarted reports its last loss
    tokens_per_s = 0.0
    preemption = _PreemptionNotice()
    preempted = False
    profiler = _StepProfiler(model_dir, profile_start_step, profile_steps, profile_all_processes, start_step)
    try:
      while step < train_steps:
        profiler.before(step + 1)
        state, metrics = step_fn(state, _global_batch(batch, batch_sh, batch_size), frozen, base_rng)
        consumed += 1
        step += 1
        m = jax.device_get(metrics)   # waits for the step: the profile window ends on a finished step
        profiler.after(step)
        if not bool(m["finite"]):
          ckpt.wait()
          raise NonFiniteLossError(
              f"non-finite loss at step {step} (loss={float(m['loss'])}); the update was not applied and training "
              f"stopped. Last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")
        if float(m["dropped_tokens"]) > 0:
          ckpt.wait()
          raise InputError(
              f"step {step}: {int(m['dropped_tokens'])} target tokens fell outside the model's loss positions "
              f"({getattr(model, 'loss_positions', '?')} per row): raise it to the longest target of a row (with "
              "packing, the summed targets of a packed row) or set it to 0",
              key="models.DecoderOnlyModel.loss_positions")
        last_loss = float(m["loss"])
        losses.append(last_loss)
        tokens_window += float(m["num_tokens"])
        if step % log_every == 0 or step == train_steps:
          dt = time.perf_counter() - t_window
          tokens_per_s = tokens_window / max(dt, 1e-9)
          scalars = {"loss": last_loss, "accuracy": float(m["accuracy"]), "grad_norm": float(m["grad_norm"]),
                     "tokens_per_s": tokens_per_s,
                     # optax evaluates the schedule at the update count before the update: step k applied k - 1.
                     "learning_rate": optimizers.learning_rate_at(schedule, step - 1)}
          if peak:
            scalars["mfu"] = tokens_per_s * flops_per_token / peak
          writer.write_scalars(step, scalars)
          tokens_window, t_window = 0.0, time.perf_counter()
          if pbar is not None:
            pbar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
        if pbar is not None:
          pbar.update(1)
        if eval_every and eval_split and (step % eval_every == 0 or step == train_steps):
          eval_loss = evaluate(eval_fn, state.params, frozen, mixture_or_task_name, task_feature_lengths, eval_split,
                               batch_size, converter, seed, eval_batches, use_cached_tasks, batch_sh)
          if eval_loss is not None:
            writer.write_scalars(step, {"eval_loss": eval_loss})
        preempted = preemption.reached(step)   # every step on every host: the sync protocol needs it
        if step % checkpoint_every == 0 or step == train_steps or preempted:
          ckpt.save(step, state, {"batches_consumed": consumed, "step": step, "last_loss": last_loss, **run_identity},
                    force=True)
          if checkpoint_data_position and batches.save(data_dir(step)):
            _prune_data_positions(os.path.dirname(os.path.dirname(data_dir(step))), os.path.basename(data_dir(step)),
                                  keep={step, *ckpt.all_steps()})
        if preempted:
          logging.warning("preemption notice: checkpoint saved at step %d; run the same command again to resume",
                          step)
          break
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
          break
        if step < train_steps:
          batch = next(batches)
    finally:
      preemption.close()
      profiler.close()
    preempted = preempted and step < train_steps   # a notice at the last step: the run is complete
    ckpt.wait()
    ckpt.close()
    writer.flush()
    if pbar is not None:
      pbar.close()
    full = lora_lib.merge(frozen, state.params, lora) if lora is not None else state.params
    if step >= train_steps:   # every process takes part in the orbax save; process 0 writes model.gin
      params_io.save_params(model_dir, full,
                            model_gin=_model_gin_text(model) if jax.process_index() == 0 else None)
      if jax.process_index() == 0:
        params_io.save_vocabulary_record(model_dir, mixture_or_task_name, data_lib.get_task(
            mixture_or_task_name).output_features["targets"].vocabulary)
  return TrainResult(step=step, last_loss=last_loss, losses=losses, eval_loss=eval_loss, params=full,
                     model_dir=model_dir, tokens_per_s=tokens_per_s, resumed_from=resumed_from,
                     preempted=preempted, mesh=mesh)


def _data_position_name(shard_index: int, num_shards: int) -> str:
  return f"shard_{shard_index}-of-{num_shards}.process_{jax.process_index()}"


def _prune_data_positions(root: str, mine: str, keep: set[int]) -> None:
  """Removes this process's saved input positions of steps the checkpoint manager no longer keeps."""
  for name in filesystem.listdir(root) if filesystem.isdir(root) else []:
    if name.isdigit() and int(name) not in keep:
      filesystem.rmtree(os.path.join(root, name, mine), ignore_errors=True)
      with contextlib.suppress(OSError):   # the last process out removes the step's directory
        filesystem.rmdir(os.path.join(root, name))


def _report_truncation(counts: Mapping, lengths: Mapping[str, int], model_dir: str) -> None:
  """Says how many training rows seqio trims to TASK_FEATURE_LENGTHS (sampled), in the log and in
  MODEL_DIR/truncation.json."""
  atomic_files.write_json(os.path.join(model_dir, "truncation.json"), counts, indent=1)
  for task, features in counts.items():
    for feature, c in features.items():
      if c["over"]:
        logging.warning("%s: %d of the first %d %s are longer than TASK_FEATURE_LENGTHS[%r] = %d (longest %d "
                        "tokens with EOS) and are truncated to it", task, c["over"], c["examples"], feature,
                        feature, lengths[feature], c["longest"])


def _check_resume(stored: Mapping, identity: Mapping, latest: int, train_steps: int, model_dir: str) -> None:
  """Refuses to continue another run's checkpoint: `batches_consumed` only places the data stream for the same
  seed, batch size, task, lengths and packing. Checkpoints written before these were recorded are not checked."""
  json_identity = json.loads(json.dumps(identity, default=str))
  for key, value in json_identity.items():
    if key in stored and stored[key] != value:
      stored_v = stored[key]
      if isinstance(value, dict) and isinstance(stored_v, dict):   # name the fields that differ
        diff = sorted(k for k in set(value) | set(stored_v) if value.get(k) != stored_v.get(k))
        stored_v, value = {k: stored_v.get(k) for k in diff}, {k: value.get(k) for k in diff}
      raise InputError(f"holds a run with {key}={stored_v!r}, this config has {value!r}: resuming needs the "
                       f"same {key}; pass a new MODEL_DIR", path=model_dir)
  if latest > train_steps:
    raise InputError(f"holds a checkpoint at step {latest}, past TRAIN_STEPS={train_steps}; raise TRAIN_STEPS or "
                     "pass a new MODEL_DIR", path=model_dir)


def evaluate(eval_fn, trainable, frozen, task, lengths, split, batch_size, converter, seed, max_batches,
             use_cached, batch_shardings=None) -> float | None:
  """Token-weighted loss over the first `max_batches` batches of `split`, every row of them: a last, short batch
  is padded with zero-weight rows, and in a multi-host job every process runs as many batches as the process
  with the most (zero-weight batches where its shard ran out), so no row is dropped and the collectives match."""
  from genret_jax.training import data as data_lib
  shard_index, num_shards = _data_shard(batch_shardings, batch_size)
  try:
    ds = data_lib.get_dataset(task, lengths, split, batch_size, converter, seed=seed, shuffle=False, num_epochs=1,
                              use_cached=use_cached, shard_index=shard_index, num_shards=num_shards,
                              drop_remainder=False)
  except ValueError as e:  # seqio's unknown split: evaluation is optional, say so once
    logging.warning("eval split %r unavailable for %s: %s", split, task, e)
    return None
  local = batch_size // num_shards
  batches = list(itertools.islice(data_lib.numpy_batches(ds), max_batches))
  count = len(batches)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
  empty = {k: np.zeros((local,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype)
           for k, spec in ds.element_spec.items()}
  tot, n = 0.0, 0.0
  for i in range(count):
    batch = batches[i] if i < len(batches) else empty
    batch = {k: np.concatenate([v, empty[k][:local - len(v)]]) if len(v) < local else v for k, v in batch.items()}
    m = jax.device_get(eval_fn(trainable, frozen, _global_batch(batch, batch_shardings, batch_size)))
    if float(m["dropped_tokens"]) > 0:
      raise InputError(f"evaluation of {task}/{split}: {int(m['dropped_tokens'])} target tokens fell outside the "
                       "model's loss positions", key="models.DecoderOnlyModel.loss_positions")
    tot += float(m["loss_sum"])
    n += float(m["num_tokens"])
  if not n:
    logging.warning("eval split %r of %s has no target tokens: no eval loss", split, task)
  return tot / n if n else None


def load_params(path: str, model, mesh, batch_shapes) -> Params:
  """Params from `<path>/params` (a finished `genret train` MODEL_DIR or a `convert-hf` output), restored
  directly into their mesh shardings."""
  return params_io.restore_params(path, params_io.abstract_with_shardings(model, mesh, batch_shapes))


def _train_flops_per_token(model, batch) -> float:
  """Training FLOPs per processed token for MFU (accounting.py: 6N + attention + logits)."""
  from genret_jax.models import accounting
  if "encoder_input_tokens" in batch:
    lin, lt = batch["encoder_input_tokens"].shape[1], batch["decoder_target_tokens"].shape[1]
  else:   # prefix-LM: the whole packed sequence runs through the decoder
    lin, lt = 0, batch["decoder_target_tokens"].shape[1]
  return float(accounting.train_flops_per_token(model.config, lin, lt).total)


def _model_gin_text(model) -> str:
  """A gin that rebuilds the model for inference: the run's operative config when the model came from gin
  (`genret cgl` / `retrieve` also read MIXTURE_OR_TASK_NAME etc. from it), else the size gin of its config."""
  run_config = gin.config_str()
  if "models.get_model.model" in run_config or "MODEL =" in run_config:
    return run_config
  from genret_jax.models import hf_convert
  return hf_convert.gin_for_config(model.config).replace("# Converted from Hugging Face", "# Trained model", 1)


class _NullWriter:
  def write_scalars(self, step, scalars):
    del step, scalars

  def flush(self):
    pass


def _make_writer(model_dir: str):
  if jax.process_index() != 0:
    return _NullWriter()
  from clu import metric_writers
  # create_default_writer's synchronous writers, without its epath.Path(logdir): that knows gs:// but no other
  # scheme tf.summary writes to (ram://, which the tests use for an object store).
  return metric_writers.MultiWriter([metric_writers.LoggingWriter(),
                                     metric_writers.SummaryWriter(os.path.join(model_dir, "train"))])


def _progress(start, total, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
