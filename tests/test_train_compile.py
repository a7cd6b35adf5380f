"""`genret train-compile` on this host's 8 simulated CPU devices (TPU topologies need libtpu, which CI does not
install; docs/training.md has what it printed for TPU slices): the step `genret train` runs, compiled for a mesh,
with XLA's per-device memory, its collectives and the fit check."""

import importlib.util

import jax
import pytest

from genret_jax import cli, gin_utils
from genret_jax.models import get_model, params_io, partitioning
from genret_jax.training import train_compile

TINY = ["--gin_file=runs/train.gin", "--gin_file=models/t5_1_1/tiny.gin", "--topology=cpu", "--gin.BATCH_SIZE=8"]


def _report(mesh, extra=()):
  gin_utils.parse_gin(["runs/train.gin", "models/t5_1_1/tiny.gin"],
                      ["BATCH_SIZE = 8", *(f"MeshConfig.{k} = {v}" for k, v in mesh.items()), *extra])
  return train_compile.compile_train_step("cpu")


@pytest.fixture(scope="module")
def replicated():
  return _report({"data": 8, "fsdp": 1, "model": 1})


def test_sharding_divides_what_a_device_holds(replicated):
  sharded = _report({"data": 2, "fsdp": 2, "model": 2})
  model = get_model()
  abstract = params_io.abstract_with_shardings(model, partitioning.make_mesh(2, 2, 2), {
      "encoder_input_tokens": (1, 64), "decoder_input_tokens": (1, 16)})
  assert sharded.num_params == replicated.num_params == sum(x.size for x in jax.tree.leaves(abstract))
  assert replicated.mesh == {"data": 8, "fsdp": 1, "model": 1} and sharded.mesh == {"data": 2, "fsdp": 2, "model": 2}
  assert sharded.feature_lengths == {"encoder_input_tokens": 64, "decoder_target_tokens": 16,
                                     "decoder_input_tokens": 16, "decoder_loss_weights": 16}
  # fp32 params: a replicated state holds every parameter on every device (plus Adafactor's factored moments).
  assert replicated.argument_bytes >= 4 * replicated.num_params
  # fsdp x model = 4 shards of every large kernel: well under half of the replicated state per device.
  assert sharded.argument_bytes < 0.5 * replicated.argument_bytes
  # The new state is written in place of the donated one.
  assert sharded.alias_bytes > 0 and sharded.peak_bytes < sharded.argument_bytes + sharded.temp_bytes + \
      sharded.output_bytes
  # Data parallelism all-reduces gradients; fsdp gathers weights before use.
  assert replicated.collectives["all-reduce"] > 0
  assert sharded.collectives["all-gather"] > 0


def test_lora_compiles_adapters_only_as_the_state(replicated):
  full = replicated
  lora = _report({"data": 8, "fsdp": 1, "model": 1}, ["train.lora = @LoraConfig()", "LoraConfig.rank = 2"])
  assert lora.num_params == full.num_params   # the frozen base's size is reported
  # The trained state is the adapters (and their optimizer state); the frozen base is an argument too.
  assert lora.alias_bytes < 0.2 * full.alias_bytes


def test_command_prints_memory_and_fits(capsys):
  assert cli.main(["train-compile", *TINY, "--gin.MeshConfig.data=4", "--gin.MeshConfig.fsdp=2",
                   "--hbm_gib=16"]) == 0
  out = capsys.readouterr().out
  assert "mesh data 4 x fsdp 2 x model 1" in out and "per device: arguments" in out and "collectives:" in out
  assert "fits: peak" in out and "of 16 GiB per device" in out
  assert cli.main(["train-compile", *TINY, "--hbm_gib=0.0001"]) == 1
  assert "does NOT fit" in capsys.readouterr().out


def _error(capsys, *argv):
  assert cli.main(["train-compile", *argv]) == 2
  return capsys.readouterr().err.strip()


def test_bad_input(capsys):
  assert "macro %MODEL is used but never bound" in _error(capsys, "--gin_file=runs/train.gin", "--topology=cpu")
  assert "config key MODEL: no model" in _error(capsys, "--gin_file=models/t5_1_1/tiny.gin", "--topology=cpu")
  assert "config key TASK_FEATURE_LENGTHS" in _error(capsys, "--gin_file=models/t5_1_1/tiny.gin", "--topology=cpu",
                                                     "--gin.train.model=%MODEL")
  assert "config key mesh: 8 devices are not divisible" in _error(capsys, *TINY, "--gin.MeshConfig.fsdp=3")
  assert "BATCH_SIZE 8 must split" in _error(capsys, "--gin_file=runs/train.gin", "--gin_file=models/t5_1_1/tiny.gin",
                                             "--topology=cpu", "--gin.BATCH_SIZE=8", "--gin.train.grad_accum_steps=2")
  assert "unknown slice 'v5p-7'" in _error(capsys, *TINY[:2], "--topology=v5p-7")


def test_tpu_topology_without_libtpu_names_what_it_needs(capsys, monkeypatch):
  if importlib.util.find_spec("libtpu") is not None:
    # A host with libtpu: jax's own error for a missing TPU plugin, as it reads without one (CI's case, checked
    # for real below when libtpu is absent).
    from jax.experimental import topologies

    def no_tpu(*_, **__):
      raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See https://github.com/...")
    monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
  err = _error(capsys, *TINY[:2], "--topology=v5p-8")
  assert err.startswith("genret train-compile: error: config key --topology: cannot make TPU topology 'v5p:2x2x1'")
  assert "pip install 'libtpu==0.0.42.*'" in err


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_optimizer_state_is_sharded_like_the_params(optimizer):
  """Leaves shaped like their parameter (Adafactor's unfactored second moment, Adam's moments) live where the
  parameter does; XLA's propagation had left the zeros optax makes them from replicated on every device."""
  from genret_jax.training import optimizers, trainer
  gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], [])
  model = get_model()
  mesh = partitioning.make_mesh(1, 8, 1)
  params = params_io.abstract_with_shardings(model, mesh, {"encoder_input_tokens": (1, 64),
                                                           "decoder_input_tokens": (1, 16)})
  tx = optimizers.make_optimizer(optimizer, learning_rate=1e-3)
  batch_sh = {k: partitioning.batch_sharding(mesh, 2) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                                                "decoder_target_tokens", "decoder_loss_weights")}
  with jax.set_mesh(mesh):
    steps = trainer.jit_state_and_step(model, tx, mesh, params, None, batch_sh)
  param_of = {tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  shape_of = {tuple(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(steps.abstract_state.opt_state)[0]}
  checked = 0
  for path, sharding in jax.tree_util.tree_flatten_with_path(steps.state_shardings.opt_state)[0]:
    shape = shape_of[tuple(path)]
    for i in range(len(path)):
      param = param_of.get(tuple(path[i:]))
      if param is not None and param.shape == shape:
        assert sharding.is_equivalent_to(param.sharding, len(shape)), jax.tree_util.keystr(path)
        checked += not param.sharding.is_fully_replicated
        break
  assert checked >= 10   # the sharded kernels' moments


def test_collectives_count_tpu_reduce_scatter_fusions_as_reduce_scatters():
  """XLA:TPU's text for an FSDP gradient: an `all-reduce-scatter` computation (all-reduce + its shard's slice)
  called as a fusion; an async all-gather; a plain all-reduce."""
  hlo = """%all-reduce-scatter.4.clone.1 (input.18: bf16[4096,11008]) -> bf16[1024,11008] {
  %input.18 = bf16[4096,11008]{1,0} parameter(0)
  %all-reduce.196 = bf16[4096,11008]{1,0} all-reduce(%input.18), channel_id=52, to_apply=%add.11.clone
  ROOT %dynamic-slice.380 = bf16[1024,11008]{1,0} dynamic-slice(%all-reduce.196, %m, %c), dynamic_slice_sizes={4,8}
}

ENTRY %main.1 (p: bf16[4,80,11008]) -> f32[] {
  %fusion.479 = bf16[1024,11008]{1,0} fusion(%convolution.1), kind=kCustom, calls=%all-reduce-scatter.4.clone.1
  %all-gather-start.3 = (bf16[1024,512]{1,0}, bf16[4096,512]{1,0}) all-gather-start(%p.1), dimensions={0}
  %all-gather-done.3 = bf16[4096,512]{1,0} all-gather-done(%all-gather-start.3)
  ROOT %all-reduce.2 = f32[] all-reduce(%x), to_apply=%add
}
"""
  assert train_compile.count_collectives(hlo) == {"all-gather": 1, "all-reduce": 1, "reduce-scatter": 1,
                                                  "all-to-all": 0, "collective-permute": 0}


def test_cloud_tpu_slice_names_map_to_libtpu_topologies():
  name = train_compile.topology_name
  assert [name(n) for n in ("v5p-8", "v4-32", "v5litepod-16", "v5e-256", "v6e-8", "v5p:2x2x1", "cpu")] == [
      "v5p:2x2x1", "v4:2x2x4", "v5e:4x4", "v5e:16x16", "v6e:2x4", "v5p:2x2x1", "cpu"]
  from genret_jax.errors import InputError
  with pytest.raises(InputError, match="unknown slice 'v5p-7'.*v5p-8, v5p-16"):
    name("v5p-7")
