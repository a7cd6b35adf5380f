"""Trainer: loss goes down, exact kill-resume, sharded == single device, 1 -> 8 device restore, NaN guard, LoRA."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

sys.path.insert(0, os.path.dirname(__file__))
import toy_tasks  # noqa: E402

from genret_jax.errors import InputError  # noqa: E402
from genret_jax.models import model_api, params_io  # noqa: E402
from genret_jax.models.llama import LlamaConfig  # noqa: E402
from genret_jax.models.t5 import T5Config  # noqa: E402
from genret_jax.training import lora as lora_lib  # noqa: E402
from genret_jax.training import trainer  # noqa: E402

LENGTHS = {"inputs": 16, "targets": 16}
VOCAB = 1024


def t5():
  return model_api.EncoderDecoderModel(T5Config(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))


def llama():
  return model_api.DecoderOnlyModel(LlamaConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                                                num_kv_heads=2, d_ff=64, dtype="float32"))


def _train(model, model_dir, steps, **kw):
  kw.setdefault("optimizer", optax.adamw(3e-3))
  kw.setdefault("mesh_config", trainer.MeshConfig(data=1))
  return trainer.train(model=model, mixture_or_task_name=toy_tasks.TASK, task_feature_lengths=LENGTHS,
                       train_steps=steps, model_dir=str(model_dir), batch_size=kw.pop("batch_size", 8), seed=0,
                       progress=False, write_config=kw.pop("write_config", False),
                       checkpoint_every=kw.pop("checkpoint_every", 2), **kw)


@pytest.mark.parametrize("make_model", [t5, llama], ids=["t5", "llama"])
def test_loss_decreases_and_params_saved(tmp_path, make_model):
  res = _train(make_model(), tmp_path / "run", 30, eval_every=30, eval_batches=2)
  assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5]) - 0.5
  assert res.eval_loss is not None and np.isfinite(res.eval_loss)
  assert params_io.has_params(tmp_path / "run")
  restored = params_io.restore_params(tmp_path / "run")
  np.testing.assert_array_equal(jax.tree.leaves(restored)[0], jax.tree.leaves(res.params)[0])
  assert os.listdir(tmp_path / "run" / "train")  # TensorBoard event files


def test_sharded_equals_single_device_and_restore_onto_mesh(tmp_path):
  assert jax.device_count() == 8
  # SGD: Adam's normalised update would amplify float32 reduction-order noise into ~1e-5 param differences.
  sgd = lambda: optax.sgd(0.5)
  single = _train(t5(), tmp_path / "s", 4, optimizer=sgd())
  sharded = _train(t5(), tmp_path / "m", 4, optimizer=sgd(),
                   mesh_config=trainer.MeshConfig(data=2, fsdp=2, model=2))
  np.testing.assert_allclose(single.losses, sharded.losses, atol=1e-5)
  for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  # Parameters really are sharded on the 8-device mesh.
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded.params)}
  assert any("model" in s for s in specs) and any("fsdp" in s for s in specs)
  # A checkpoint written on one device restores onto the 8-device mesh and training continues identically.
  part = _train(t5(), tmp_path / "r", 4, optimizer=sgd(), stop_after_steps=2)
  assert part.step == 2
  cont = _train(t5(), tmp_path / "r", 4, optimizer=sgd(),
                mesh_config=trainer.MeshConfig(data=2, fsdp=2, model=2))
  assert cont.resumed_from == 2
  assert len(jax.tree.leaves(cont.params)[0].sharding.device_set) == 8
  for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(cont.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(trainer.NonFiniteLossError, match="non-finite"):
    _train(t5(), tmp_path / "nan", 6, optimizer=optax.sgd(float("inf")))
  from genret_jax.training.checkpoints import Checkpointer
  assert Checkpointer(str(tmp_path / "nan" / "checkpoints")).latest_step() is None
  # After two good steps the poisoned update is refused and the step-2 checkpoint stays the latest.
  sched = lambda step: jnp.where(step < 2, 1e-3, jnp.inf)
  with pytest.raises(trainer.NonFiniteLossError, match="Last good checkpoint: step 2"):
    _train(t5(), tmp_path / "nan2", 6, optimizer=optax.sgd(sched))


def test_lora_trains_only_adapters(tmp_path):
  model = t5()
  base_dir = tmp_path / "base"
  base = _train(model, base_dir, 2)
  cfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
  res = _train(model, tmp_path / "lora", 12, lora=cfg, initial_checkpoint_path=str(base_dir),
               optimizer=optax.adamw(2e-2))
  targets = set(lora_lib.target_paths(base.params, cfg))
  # T5 names its projections query/value (self- and cross-attention), LLaMA q/v: both are the paper's targets.
  assert targets and all(re.search(r"(^|/)(q|v|query|value)/kernel$", t) for t in targets)
  flat_b = {lora_lib._path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(base.params)[0]}
  flat_m = {lora_lib._path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(res.params)[0]}
  for name, value in flat_b.items():
    if name in targets:
      assert not np.array_equal(value, flat_m[name]), name   # merged adapters moved q/v
    else:
      np.testing.assert_array_equal(value, flat_m[name])      # everything else frozen
  assert np.mean(res.losses[-3:]) < np.mean(res.losses[:3])


GIN = toy_tasks.train_gin(steps=120, mesh_data=1)


def _cmd(model_dir, gin_path):
  return [sys.executable, "-m", "genret_jax.cli", "train", f"--gin_file={gin_path}",
          f"--gin.train.model_dir=\"{model_dir}\""]


def test_sigkill_and_restart_is_bit_identical(tmp_path):
  gin_path = tmp_path / "toy.gin"
  gin_path.write_text(GIN)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", XLA_FLAGS="")
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  subprocess.run(_cmd(ref, gin_path), check=True, env=env, capture_output=True, timeout=300)
  proc = subprocess.Popen(_cmd(killed, gin_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckdir = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:   # kill mid-training, once at least one checkpoint is complete
    done = [d for d in (os.listdir(ckdir) if ckdir.exists() else []) if d.isdigit() and int(d) >= 10]
    if done:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not params_io.has_params(killed), "the run finished before it was killed"
  subprocess.run(_cmd(killed, gin_path), check=True, env=env, capture_output=True, timeout=300)
  a, b = params_io.restore_params(ref), params_io.restore_params(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_required_settings_are_named(capsys):
  """A run gin's `%gin.REQUIRED` macros left unbound: one line naming the macro (it was a TypeError from
  inside train()); with no run gin at all, gin's own list of unbound parameters, also one line."""
  import gin
  from genret_jax import cli
  try:
    assert cli.main(["train", "--gin_file=runs/train.gin", "--gin_file=models/t5_1_1/tiny.gin",
                     "--gin.TRAIN_STEPS=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("genret train: error: config key MODEL_DIR: MODEL_DIR is required: bind it in a gin file or "
                   "pass --gin.MODEL_DIR=...")
    assert cli.main(["train", "--gin_file=models/t5_1_1/tiny.gin"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genret train: error: gin config: Required bindings for `train`") and "\n" not in err
  finally:
    gin.clear_config()


def test_resume_refuses_another_runs_checkpoint_and_keeps_the_last_loss(tmp_path):
  """`batches_consumed` places the data stream only for the same seed, batch size, task and lengths, so another
  config's checkpoint is refused (it was continued silently); a finished run restarted (a sweep cell that died
  after training) reports the loss it ended with, not NaN."""
  sgd = lambda: optax.sgd(0.5)
  done = _train(t5(), tmp_path / "r", 2, optimizer=sgd())
  again = _train(t5(), tmp_path / "r", 2, optimizer=sgd())
  assert again.resumed_from == 2 and again.last_loss == done.last_loss and np.isfinite(again.last_loss)
  # The params record their vocabulary: `retrieve` / `cgl` refuse a task whose vocabulary was rebuilt since (a
  # changed corpus retrains it; the old params ran on the new token ids silently).
  params_io.check_vocabulary(tmp_path / "r", toy_tasks.VOCAB)
  with pytest.raises(InputError, match="vocabulary.json: these params were trained on task 'genret_test_reverse'"):
    params_io.check_vocabulary(tmp_path / "r", seqio.SentencePieceVocabulary(toy_tasks.SPM, extra_ids=1))
  with pytest.raises(InputError, match="seed=0, this config has 7"):
    trainer.train(model=t5(), mixture_or_task_name=toy_tasks.TASK, task_feature_lengths=LENGTHS, train_steps=4,
                  model_dir=str(tmp_path / "r"), batch_size=8, seed=7, progress=False, write_config=False,
                  optimizer=sgd(), mesh_config=trainer.MeshConfig(data=1))
  with pytest.raises(InputError, match="batch_size=8, this config has 4"):
    trainer.train(model=t5(), mixture_or_task_name=toy_tasks.TASK, task_feature_lengths=LENGTHS, train_steps=4,
                  model_dir=str(tmp_path / "r"), batch_size=4, seed=0, progress=False, write_config=False,
                  optimizer=sgd(), mesh_config=trainer.MeshConfig(data=1))
  with pytest.raises(InputError, match="past TRAIN_STEPS=1"):
    _train(t5(), tmp_path / "r", 1, optimizer=sgd())
  # Another model's checkpoint: one line naming the field (it was orbax's 700-line shape error), and the refused
  # run leaves the checkpointed run's config.gin as it was.
  gin_text = "# the checkpointed run's config\n"
  (tmp_path / "r" / "config.gin").write_text(gin_text)
  wider = model_api.EncoderDecoderModel(T5Config(vocab_size=VOCAB, d_model=64, num_heads=2, head_dim=16, d_ff=64,
                                                 num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))
  with pytest.raises(InputError, match=r"model=\{'d_model': 32\}, this config has \{'d_model': 64\}"):
    _train(wider, tmp_path / "r", 4, optimizer=sgd(), write_config=True)
  assert (tmp_path / "r" / "config.gin").read_text() == gin_text


def test_truncated_rows_are_counted(tmp_path, caplog):
  """seqio trims rows longer than TASK_FEATURE_LENGTHS without a word; the trainer counts them (a sample of each
  task's first rows) in its log and MODEL_DIR/truncation.json."""
  import json
  import logging
  with caplog.at_level(logging.WARNING):
    trainer.train(model=t5(), mixture_or_task_name=toy_tasks.TASK, task_feature_lengths={"inputs": 16, "targets": 6},
                  train_steps=1, model_dir=str(tmp_path / "t"), batch_size=8, progress=False, write_config=False,
                  mesh_config=trainer.MeshConfig(data=1))
  counts = json.loads((tmp_path / "t" / "truncation.json").read_text())[toy_tasks.TASK]
  # 256 reversed word lists of 3-6 words: 149 take more than 6 pieces with EOS, the longest 17; 6 inputs > 16.
  assert counts == {"inputs": {"examples": 256, "over": 6, "longest": 17},
                    "targets": {"examples": 256, "over": 149, "longest": 17}}
  assert "149 of the first 256 targets are longer than TASK_FEATURE_LENGTHS['targets'] = 6" in caplog.text


def test_model_vocabulary_smaller_than_the_tasks_is_refused(tmp_path):
  """Token ids past the embedding table made the loss NaN a few steps in; now one error before training."""
  small = model_api.EncoderDecoderModel(T5Config(vocab_size=16, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                 num_encoder_layers=1, num_decoder_layers=1, dtype="float32"))
  with pytest.raises(InputError, match=r"model's vocabulary \(16\) is smaller than the task's"):
    _train(small, tmp_path / "v", 2)


def test_bad_sizes_are_named_before_anything_runs(tmp_path):
  """BATCH_SIZE 0 reached TF's batch op, lengths without `targets` seqio's converter, a string TRAIN_STEPS a
  comparison TypeError."""
  for kw, key in ((dict(batch_size=0), "BATCH_SIZE"), (dict(train_steps="two"), "TRAIN_STEPS"),
                  (dict(task_feature_lengths={"inputs": 8}), "TASK_FEATURE_LENGTHS"),
                  # 0 kept no checkpoint (orbax max_to_keep=0) / divided by zero after the first step:
                  (dict(keep_checkpoints=0), "train.keep_checkpoints"),
                  (dict(checkpoint_every=0), "train.checkpoint_every"), (dict(log_every=0), "train.log_every"),
                  (dict(seed="abc"), "train.seed"),
                  # jax's IndivisibleError, which names no setting:
                  (dict(batch_size=6, mesh_config=trainer.MeshConfig(data=4)), "BATCH_SIZE"),
                  (dict(batch_size=8, grad_accum_steps=4, mesh_config=trainer.MeshConfig(data=4)),
                   "train.grad_accum_steps"),
                  (dict(learning_rate="fast"), "make_optimizer.learning_rate")):
    args = dict(model=t5(), mixture_or_task_name=toy_tasks.TASK, task_feature_lengths=LENGTHS, train_steps=2,
                model_dir=str(tmp_path / "x"), batch_size=8, progress=False, write_config=False)
    with pytest.raises(InputError, match=f"config key {re.escape(key)}:"):
      trainer.train(**{**args, **kw})
  assert not (tmp_path / "x").exists()
  with pytest.raises(InputError, match="config key LoraConfig.rank:"):
    lora_lib.LoraConfig(rank=0)
  with pytest.raises(InputError, match="config key models.T5Config.dropout_rate:"):
    T5Config(vocab_size=VOCAB, dropout_rate=1.5)
  from genret_jax.training import optimizers
  for kw, key in ((dict(warmup_steps=-5), "warmup_steps"), (dict(base_learning_rate=-1.0), "base_learning_rate")):
    with pytest.raises(InputError, match=f"config key make_schedule.{key}:"):
      optimizers.make_schedule(**kw)


def test_gradient_accumulation_equals_one_batch_and_moves_no_rows(tmp_path):
  """Microbatches are strided over the batch: each device's rows hold a share of every microbatch, so the
  accumulation loop needs no collective beyond the gradient all-reduce (contiguous microbatches put each on a
  quarter of the devices here: all-gathers and collective-permutes in every iteration)."""
  sgd, mesh = lambda: optax.sgd(0.5), trainer.MeshConfig(data=8)
  one = _train(t5(), tmp_path / "a1", 2, optimizer=sgd(), batch_size=32, mesh_config=mesh, dropout=False)
  four = _train(t5(), tmp_path / "a4", 2, optimizer=sgd(), batch_size=32, mesh_config=mesh, dropout=False,
                grad_accum_steps=4)
  np.testing.assert_allclose(four.losses, one.losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  model, tx = t5(), optax.sgd(0.1)
  batch = {k: np.zeros((32, 16), np.int32) for k in
           ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
  with jax.set_mesh(mesh.build()) as m:
    m = mesh.build()
    params = model.init_sharded(jax.random.key(0), m, {k: (1, 16) for k in batch})
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    rep = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec())
    step = jax.jit(trainer.make_train_step(model, tx, 4, None, False),
                   in_shardings=(jax.tree.map(lambda x: x.sharding, state), trainer._batch_specs(batch, m), None, rep))
    hlo = step.lower(state, batch, None, jax.random.key(1)).compile().as_text()
  assert not re.search(r"(all-gather|collective-permute)(-start)?\(", hlo)


def test_evaluation_counts_every_row(tmp_path):
  """The validation split has 31 rows: at batch 8 the last batch is short, padded with zero-weight rows, not
  dropped, so the loss equals one batch of all 31 (and a split smaller than a batch gives a loss, not None)."""
  from genret_jax.training import data as data_lib
  model = t5()
  mesh = trainer.MeshConfig(data=1).build()
  params = trainer.initial_params(model, 0, mesh, {k: (1, 16) for k in ("encoder_input_tokens",
                                                                        "decoder_input_tokens")})
  eval_fn = jax.jit(trainer.make_eval_step(model))
  conv = data_lib.feature_converter_for("t5")
  loss = lambda bs: trainer.evaluate(eval_fn, params, None, toy_tasks.TASK, LENGTHS, "validation", bs, conv, 0, 100,
                                     False)
  whole, batched, larger = loss(31), loss(8), loss(64)
  assert np.isfinite(whole)
  np.testing.assert_allclose([batched, larger], [whole, whole], rtol=1e-6)


def test_step_that_poisons_the_optimizer_state_is_not_applied():
  """Finite loss, gradients and params but an optimizer state gone inf (an Adam moment overflowing): the step is
  refused and the state kept, as for a NaN loss."""
  model = t5()
  batch = {k: np.ones((4, 16), np.int32) for k in
           ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
  params = model.init(jax.random.key(0), {k: (1, 16) for k in batch})

  def update(updates, state, params=None):
    return jax.tree.map(jnp.zeros_like, updates), {"moment": state["moment"] + jnp.where(state["poison"], jnp.inf, 1.0),
                                                   "poison": state["poison"]}

  for poison, applied in ((False, True), (True, False)):
    tx = optax.GradientTransformation(lambda p: {"moment": jnp.zeros(()), "poison": jnp.array(poison)}, update)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    new, metrics = jax.jit(trainer.make_train_step(model, tx, 1, None, False))(state, batch, None, jax.random.key(1))
    assert bool(metrics["finite"]) == applied
    assert float(new.opt_state["moment"]) == (1.0 if applied else 0.0)


def test_gradient_accumulation_sums_in_float32_for_bfloat16_params():
  """bf16 params: 16 microbatch gradients summed in float32 stay within 2x of the exact gradient's bf16 rounding
  error (summed in bf16: 3.1x)."""
  model = model_api.EncoderDecoderModel(T5Config(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                                 num_encoder_layers=1, num_decoder_layers=1, dtype="float32",
                                                 param_dtype="bfloat16"))
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(2, VOCAB, (32, 16)).astype(np.int32) for k in
           ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
  batch["decoder_loss_weights"] = np.ones((32, 16), np.int32)
  params = model.init(jax.random.key(0), {k: (1, 16) for k in batch})
  captured = {}

  def update(grads, state, params=None):
    captured["grads"] = grads
    return jax.tree.map(jnp.zeros_like, grads), state

  tx = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = trainer.make_train_step(model, tx, 16, None, False)
  grads = jax.jit(lambda s, b: (step(s, b, None, jax.random.key(1)), captured["grads"])[1])(state, batch)
  f32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  exact = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(f32)
  flat = lambda tree: np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  g, e = flat(grads), flat(exact)
  rounding = np.linalg.norm(flat(jax.tree.map(lambda x: x.astype(jnp.bfloat16), exact)) - e)
  # Measured: float32 sums 1.4x the rounding error of the exact gradient, bf16 sums 3.1x.
  assert np.linalg.norm(g - e) < 2 * rounding


def test_peak_flops_by_device_kind():
  """MFU's denominator: a v5p reports "TPU v5" (it fell through to the CPU matmul), an L40S is no L4."""
  assert trainer.peak_flops_for("TPU v5") == 459e12
  assert trainer.peak_flops_for("TPU v5 lite") == 197e12
  assert trainer.peak_flops_for("TPU v6 lite") == 918e12
  assert trainer.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
  assert trainer.peak_flops_for("NVIDIA GH200 480GB") == 989e12
  assert trainer.peak_flops_for("NVIDIA L40S") == 362e12
  assert trainer.peak_flops_for("NVIDIA L4") == 121e12
  assert trainer.peak_flops_for("cpu") is None and trainer.peak_flops_for("NVIDIA GeForce RTX 4090") is None


def test_resume_restores_the_input_pipeline_or_skips_to_the_same_place(tmp_path, caplog):
  """A restart restores each process's tf.data iterator saved with the checkpoint (no re-run of the consumed
  batches); with that save missing it skips them. Either way the run equals an uninterrupted one, and only the
  positions of kept checkpoints stay on disk."""
  import logging
  import shutil
  sgd = lambda: optax.sgd(0.5)
  whole = _train(t5(), tmp_path / "whole", 6, optimizer=sgd(), keep_checkpoints=1)
  assert sorted(os.listdir(tmp_path / "whole" / "checkpoints_data")) == ["6"]
  for name, drop_positions in (("restored", False), ("skipped", True)):
    _train(t5(), tmp_path / name, 6, optimizer=sgd(), keep_checkpoints=1, stop_after_steps=4)
    if drop_positions:
      shutil.rmtree(tmp_path / name / "checkpoints_data")
    caplog.clear()
    with caplog.at_level(logging.INFO):
      again = _train(t5(), tmp_path / name, 6, optimizer=sgd(), keep_checkpoints=1)
    assert again.resumed_from == 4
    assert ("input pipeline restored at batch 4" in caplog.text) == (not drop_positions)
    np.testing.assert_array_equal(again.losses, whole.losses[4:])
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(whole.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_preemption_notice_checkpoints_and_stops_then_resumes_bit_identical(tmp_path, monkeypatch):
  """SIGTERM mid-run (a spot VM's or scheduler's notice): the step in flight finishes, a checkpoint is written
  although none was due (checkpoint_every=100), `genret train` exits 143 so a scheduler restarts it, the SIGTERM
  handler is restored, and the restarted run ends bit-identical to an uninterrupted one. (Before, the signal killed
  the process and every step since the last periodic checkpoint was lost.)"""
  from genret_jax import cli
  gin_path = tmp_path / "toy.gin"
  gin_path.write_text(toy_tasks.train_gin(steps=8, mesh_data=1))
  flags = ["--gin.train.checkpoint_every=100", "--gin.train.log_every=1"]
  argv = lambda d: ["train", f"--gin_file={gin_path}", f"--gin.train.model_dir=\"{d}\"", *flags]
  assert cli.main(argv(tmp_path / "whole")) == 0
  before = signal.getsignal(signal.SIGTERM)
  real_write = trainer._NullWriter.write_scalars
  calls = []

  def notice_at_step_3(self, step, scalars):
    calls.append(step)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_write(self, step, scalars)

  monkeypatch.setattr(trainer, "_make_writer", lambda model_dir: trainer._NullWriter())
  monkeypatch.setattr(trainer._NullWriter, "write_scalars", notice_at_step_3)
  assert cli.main(argv(tmp_path / "cut")) == 143
  assert signal.getsignal(signal.SIGTERM) == before
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["3"] and calls == [1, 2, 3]
  assert not params_io.has_params(tmp_path / "cut")
  assert cli.main(argv(tmp_path / "cut")) == 0
  a, b = params_io.restore_params(tmp_path / "whole"), params_io.restore_params(tmp_path / "cut")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_profile_window_is_traced_into_model_dir(tmp_path, caplog):
  """train.profile_start_step / profile_steps: a JAX profiler trace of those steps in MODEL_DIR/profile (what
  TensorBoard's profile plugin reads); a run resuming past the window says it profiles nothing."""
  import gzip
  import json
  import logging
  _train(t5(), tmp_path / "run", 4, optimizer=optax.sgd(0.5), profile_start_step=2, profile_steps=2)
  traces = list((tmp_path / "run" / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"))
  assert len(traces) == 1 and list(traces[0].parent.glob("*.xplane.pb"))
  events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
  assert any("step_fn" in str(e.get("name", "")) for e in events)   # the window holds training steps
  with caplog.at_level(logging.WARNING):
    _train(t5(), tmp_path / "run", 6, optimizer=optax.sgd(0.5), profile_start_step=2, profile_steps=2)
  assert "the run resumes after it (step 4); nothing is profiled" in caplog.text
  assert len(list((tmp_path / "run" / "profile" / "plugins" / "profile").iterdir())) == 1
  with pytest.raises(InputError, match="train.profile_start_step"):
    _train(t5(), tmp_path / "bad", 4, profile_start_step=0)
