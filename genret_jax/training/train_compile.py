"""`genret train-compile`: compiles `genret train`'s step for a TPU slice you do not have (MaxText's
train_compile.py): the same gin files, model, optimizer, mesh and batch, lowered for a TPU topology's compile-only
devices (libtpu on this host, no TPU). Prints what one device holds (XLA's memory analysis of the step) against the
chip's HBM and the collectives XLA emitted, so a config is known to fit before a pod is booked.

  genret train-compile --gin_file=runs/train.gin --gin_file=models/llama/7b.gin --topology=v5p-8 \\
    --gin.MeshConfig.data=1 --gin.MeshConfig.fsdp=4 --gin.BATCH_SIZE=16

`--topology=cpu` compiles for this host's own devices (what the tests run). TPU topologies need libtpu:
`pip install 'libtpu==0.0.42.*'` (the version `jax[tpu]` 0.10.2 requires; docs/install.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import gin
import numpy as np

from genret_jax import gin_utils
from genret_jax.errors import InputError, check_int

# HBM per chip (GiB) by jax's device_kind; --hbm_gib covers others.
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v6 lite": 32.0}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_utils.add_gin_arguments(parser)
  parser.add_argument("--topology", required=True,
                      help="a Cloud TPU slice (v5p-8, v5litepod-16, v6e-8, v4-32, ...), a topology as libtpu names it "
                      "(v5p:2x2x1, v5e:4x4, ...), or 'cpu' for this host's devices")
  parser.add_argument("--hbm_gib", type=float, default=None,
                      help="memory per device for the fit check (default: the chip's HBM, "
                      + ", ".join(f"{k} {v:g}" for k, v in HBM_GIB.items()) + ")")


@dataclasses.dataclass
class CompileReport:
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  batch_size: int
  feature_lengths: dict
  num_params: int
  compile_seconds: float
  argument_bytes: int      # per device: the train state's shard, the batch, the key
  output_bytes: int
  alias_bytes: int         # outputs written in place of donated arguments (the new state)
  temp_bytes: int          # XLA's scratch: activations, gradients, gathered weights
  collectives: dict

  @property
  def peak_bytes(self) -> int:
    """Live at once on one device: arguments + scratch + outputs not aliased onto donated arguments."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


class DoesNotFit(Exception):
  """The compiler refused the step for the device's memory (its message says by how much)."""


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops of a compiled module's text. Async ones appear as a -start / -done pair: the starts count.
  XLA:TPU writes a reduce-scatter as an `all-reduce-scatter` fusion (an all-reduce and its shard's dynamic-slice,
  emitted as one reduce-scatter): each such call counts as a reduce-scatter and its inner all-reduce does not."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for block in re.split(r"\n(?=(?:ENTRY )?%\S+ \()", hlo_text):
    if re.match(r"(?:ENTRY )?%all-reduce-scatter", block):
      continue
    for c in COLLECTIVES:
      counts[c] += len(re.findall(r"= [^=\n]*? " + c + r"(?:-start)?\(", block))
    counts["reduce-scatter"] += len(re.findall(r"calls=%all-reduce-scatter", block))
  return counts


# Accelerator types as Cloud TPU names them (`v5p-8`, `v5litepod-16`, ...) -> libtpu's topology: chips laid out as
# Cloud TPU builds the slices. v4 / v5p count TensorCores (two per chip), v5e / v6e count chips.
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
       1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology_name(name: str) -> str:
  """`v5p-8` -> `v5p:2x2x1`, `v5litepod-16` / `v5e-16` -> `v5e:4x4`, `v6e-8` -> `v6e:2x4`, `v4-32` -> `v4:2x2x4`;
  a libtpu name (`v5p:2x2x1`) or `cpu` passes through."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not m:
    return name
  kind, n = m.group(1), int(m.group(2))
  kind = "v5e" if kind == "v5litepod" else kind
  chips, table = (n // 2, _3D) if kind in ("v4", "v5p") else (n, _2D)
  cores_per_chip = 2 if kind in ("v4", "v5p") else 1
  if n % cores_per_chip or chips not in table:
    known = ", ".join(f"{kind}-{c * cores_per_chip}" for c in sorted(table))
    raise InputError(f"unknown slice {name!r}: known {kind} slices are {known}; or give a libtpu topology such as "
                     f"{kind}:{table[4]}", key="--topology")
  return f"{kind}:{table[chips]}"


def topology_devices(name: str) -> list:
  import jax
  if name == "cpu":
    return jax.devices()
  from jax.experimental import topologies
  name = topology_name(name)
  # v4 / v5p topologies come as two devices (TensorCores) per chip; jax's TPU meshes want one per chip, the chip's
  # two cores driven as one ("megacore", how they train: MaxText's v4 / v5p specs).
  for config in ({}, {"chip_config_name": "megacore"}):
    try:
      devices = list(topologies.get_topology_desc(name, "tpu", **config).devices)
    except Exception as e:  # pylint: disable=broad-except
      text = str(e).splitlines()[0] if str(e) else type(e).__name__
      if "support not installed" in text or isinstance(e, (ImportError, NotImplementedError)):
        raise InputError(f"cannot make TPU topology {name!r} here ({text}); TPU topologies need libtpu on this "
                         "host: pip install 'libtpu==0.0.42.*'", key="--topology") from None
      raise InputError(f"TPU topology {name!r}: {text}", key="--topology") from None
    chips = {tuple(d.coords) for d in devices}
    if len(chips) == len(devices):
      return devices
  raise InputError(f"TPU topology {name!r} has {len(devices)} devices on {len(chips)} chips, also as megacore; "
                   "jax's TPU meshes need one device per chip", key="--topology")


def compile_train_step(topology: str) -> CompileReport:
  """Compiles the step `trainer.train` would run under the parsed gin config, for `topology`'s devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from genret_jax.models import params_io, partitioning
  from genret_jax.training import data as data_lib
  from genret_jax.training import lora as lora_lib
  from genret_jax.training import trainer

  bound = gin.get_bindings(trainer.train)
  model = bound.get("model")
  if model is None or model is gin.REQUIRED:
    raise InputError("no model: give a model gin file (e.g. --gin_file=models/llama/7b.gin)", key="MODEL")
  lengths = bound.get("task_feature_lengths")
  trainer.check_feature_lengths(lengths)
  batch_size = bound.get("batch_size", 32)
  grad_accum = bound.get("grad_accum_steps", 1)
  for key, value in (("BATCH_SIZE", batch_size), ("train.grad_accum_steps", grad_accum)):
    check_int(value, key, 1)
  mesh_config = bound.get("mesh_config") or trainer.MeshConfig()
  lora = bound.get("lora")
  # The schedule's length does not change the program; TRAIN_STEPS may be left unbound here.
  steps = bound.get("train_steps")
  tx, _ = trainer.train_optimizer(bound.get("optimizer"), bound.get("learning_rate"),
                                  steps if isinstance(steps, int) else 1000)

  devices = topology_devices(topology)
  mesh = partitioning.make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.model, devices=devices)
  trainer.check_batch_split(batch_size, grad_accum, mesh)
  converter = data_lib.feature_converter_for(model.family, pack=bool(bound.get("pack", False)))
  model_lengths = converter.get_model_feature_lengths(dict(lengths))
  batch_shapes = {k: (1, n) for k, n in model_lengths.items()}
  batch_sh = {k: partitioning.batch_sharding(mesh, 2) for k in model_lengths}
  batch = {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=batch_sh[k]) for k, n in model_lengths.items()}

  t = time.perf_counter()
  params = params_io.abstract_with_shardings(model, mesh, batch_shapes)
  rep = NamedSharding(mesh, P())
  frozen = None
  if lora is not None:
    frozen = params
    adapters = jax.eval_shape(lambda p: lora_lib.init_lora(p, lora, jax.random.key(0)), params)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), adapters)
  # Made outside the mesh context: no concrete array can be placed on compile-only devices.
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  with jax.set_mesh(mesh):
    steps = trainer.jit_state_and_step(model, tx, mesh, params, frozen, batch_sh, grad_accum, lora,
                                       bool(bound.get("dropout", True)))
    lowered = steps.step.lower(steps.abstract_state, batch, frozen, key)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # XLA:TPU itself refuses a program whose temporaries exceed the chip's HBM.
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise DoesNotFit(str(e).splitlines()[0]) from None
  seconds = time.perf_counter() - t
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  counts = count_collectives(text)
  total = frozen if frozen is not None else params
  resolved = topology_name(topology)
  return CompileReport(
      topology=topology if resolved == topology else f"{topology} ({resolved})",
      device_kind=devices[0].device_kind, num_devices=len(devices), mesh=dict(mesh.shape),
      batch_size=batch_size, feature_lengths=dict(model_lengths),
      num_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(total))), compile_seconds=seconds,
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes), collectives=counts)


def run(args) -> int:
  from genret_jax.training import trainer  # noqa: F401  (registers `train` and its configurables)
  from genret_jax.models import model_api  # noqa: F401
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
  try:
    report = compile_train_step(args.topology)
  except DoesNotFit as e:
    print(f"does NOT fit: the compiler refused the step on {args.topology}: {e}")
    return 1
  gib = lambda b: b / 2 ** 30
  hbm = args.hbm_gib if args.hbm_gib is not None else HBM_GIB.get(report.device_kind)
  mesh = " x ".join(f"{k} {v}" for k, v in report.mesh.items())
  print(f"{report.num_params / 1e9:.3f}B params, batch {report.batch_size} x {report.feature_lengths} on "
        f"{report.topology} ({report.num_devices} x {report.device_kind}), mesh {mesh}: compiled in "
        f"{report.compile_seconds:.0f} s")
  print(f"per device: arguments {gib(report.argument_bytes):.2f} GiB (state shard, batch), scratch "
        f"{gib(report.temp_bytes):.2f} GiB, outputs {gib(report.output_bytes):.2f} GiB of which "
        f"{gib(report.alias_bytes):.2f} GiB in place of donated arguments; peak {gib(report.peak_bytes):.2f} GiB")
  print("collectives: " + ", ".join(f"{k} {v}" for k, v in report.collectives.items()))
  if hbm is None:
    print(f"no HBM size known for {report.device_kind!r}: give --hbm_gib for the fit check")
    return 0
  fits = gib(report.peak_bytes) <= hbm
  print(f"{'fits' if fits else 'does NOT fit'}: peak {gib(report.peak_bytes):.2f} GiB of {hbm:g} GiB per device")
  return 0 if fits else 1
