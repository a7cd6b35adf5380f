"""benchmarks/read_profile.py reads a jax.profiler trace back into time per jax op name."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read_profile():
  spec = importlib.util.spec_from_file_location("read_profile", ROOT / "benchmarks" / "read_profile.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_time_goes_to_the_named_ops(tmp_path):
  read_profile = _read_profile()

  @jax.jit
  def program(x):
    def body(i, y):
      with jax.named_scope("heavy"):
        y = jnp.tanh(y @ x)
      with jax.named_scope("light"):
        return y + 1.0
    return jax.lax.fori_loop(0, 4, body, x)

  x = jnp.ones((512, 512), jnp.float32) / 512
  program(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    program(x).block_until_ready()
  times, counted = read_profile.op_times(read_profile._load(tmp_path))
  assert counted > 0
  heavy = sum(t for name, t in times.items() if "heavy" in name)
  light = sum(t for name, t in times.items() if "light" in name)
  assert heavy > 0 and heavy > light
  # The loop itself (a control-flow instruction spanning its body) is not counted on top of its ops.
  assert not any(name.endswith("/while") for name in times)
  assert read_profile.group("jit(search)/while/body/vmap(jit(batched_take))/gather", 1) == "while/body/gather"


def test_not_a_trace_directory(tmp_path):
  with pytest.raises(SystemExit, match="no \\*.xplane.pb"):
    _read_profile()._load(tmp_path)


def test_command_buffer_kernels_are_named_by_their_fusions():
  """XLA:GPU's CUDA-graph kernels carry the command buffer's name as `hlo_op`: they are named through their
  kernel names (fusion names with '_' for '.', '__N' for a fusion's N-th kernel), library kernels keep their
  own name, and each stream's busy time excludes its gaps and overlaps. A synthetic GPU trace around a
  real compiled program's HLO."""
  read_profile = _read_profile()
  from tensorflow.compiler.xla.service import hlo_pb2
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  @jax.jit
  def program(x):
    with jax.named_scope("heavy"):
      y = jnp.tanh(x @ x)
    with jax.named_scope("light"):
      return y + 1.0

  hlo = program.lower(jnp.ones((8, 8))).compile().runtime_executable().hlo_modules()[0]
  module = hlo_pb2.HloModuleProto.FromString(hlo.as_serialized_hlo_module_proto())
  fusions = {ins.metadata.op_name: ins.name for comp in module.computations for ins in comp.instructions
             if ins.opcode == "fusion"}
  heavy = next(name for op, name in fusions.items() if "heavy" in op)
  light = next(name for op, name in fusions.items() if "light" in op)
  for comp in module.computations:   # XLA:GPU names look like "loop_add_fusion.3": kernel "loop_add_fusion_3"
    for ins in comp.instructions:
      if ins.name == heavy:
        ins.name = heavy = heavy + ".3"

  space = xplane_pb2.XSpace()
  meta = space.planes.add(name="/host:metadata")
  meta.stat_metadata[1].name = "Hlo Proto"
  meta.event_metadata[1].name = "jit_program(7)"
  meta.event_metadata[1].stats.add(metadata_id=1, bytes_value=hlo_pb2.HloProto(
      hlo_module=module).SerializeToString())
  gpu = space.planes.add(name="/device:GPU:0")
  gpu.stat_metadata[1].name, gpu.stat_metadata[2].name = "hlo_op", "program_id"
  kernels = [read_profile.kernel_name(heavy), read_profile.kernel_name(light) + "__2", "sm80_gemm_cublas"]
  for i, name in enumerate(kernels, 1):
    gpu.event_metadata[i].name = name
  line = gpu.lines.add(name="Stream #1(Compute)")
  # (kernel, start us, duration us): a gap 10..20 and an overlap 22..25.
  for kernel, start, dur in ((1, 0, 10), (2, 20, 5), (3, 22, 8)):
    event = line.events.add(metadata_id=kernel, offset_ps=start * 10**6, duration_ps=dur * 10**6)
    event.stats.add(metadata_id=1, str_value="command_buffer_3")
    event.stats.add(metadata_id=2, int64_value=7)

  times, counted = read_profile.op_times(space)
  assert counted == 3
  named = {name: round(t * 1e6) for name, t in times.items()}
  assert named == {next(op for op in fusions if "heavy" in op): 10, next(op for op in fusions if "light" in op): 5,
                   "command_buffer_3: sm80_gemm_cublas": 8}
  [(stream, busy, span, events)] = read_profile.device_busy(space)
  assert stream.endswith("Stream #1(Compute)") and events == 3
  assert round(busy * 1e6) == 20 and round(span * 1e6) == 30
