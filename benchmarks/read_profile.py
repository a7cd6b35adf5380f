"""Where the time of a traced jax call goes, by jax op name: reads the jax.profiler traces that
`decode_throughput.py --profile_dir` writes (e.g. the `profiles.tgz` a lent GPU returns), on any machine.

  .venv/bin/python benchmarks/read_profile.py DIR [DIR ...] [--depth 3] [--top 25]

Each DIR holds one trace (a `*.xplane.pb` below it). Events of XLA's executions are summed per HLO instruction
(their `hlo_op` / `program_id` stats), and each instruction is named by the jax op that produced it (the HLO
protos the trace carries). Counted: kernels on GPU device planes ("/device:GPU:N"), op events of XLA:CPU's worker
threads ("/host:CPU" lines "tf_XLA..."). Control-flow instructions (while, conditional, call) are left out, as
their events span the ops inside them. Times are summed over events, so on CPU, where ops run on two threads,
they can add up to more than the call's wall time.

XLA:GPU replays runs of kernels as CUDA graphs ("command buffers"): their kernels carry the command buffer's
name as `hlo_op`, an instruction the trace's HLO protos (taken before that pass) do not have. Such a kernel is
named by its own name instead, which is its fusion's instruction name with '.' and '-' written as '_' (and
"__N" for a fusion's N-th kernel); library kernels (cuBLAS GEMMs, memcpy) keep their kernel name. On GPU the
report also gives each stream's busy time against the span from its first to its last kernel: the gaps are
where the device waited for the host (a while loop's predicate read back every round, launches).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys

CONTROL_FLOW = {"while", "conditional", "call"}


def _load(trace_dir: pathlib.Path):
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  paths = sorted(trace_dir.rglob("*.xplane.pb"))
  if not paths:
    raise SystemExit(f"{trace_dir}: no *.xplane.pb below it (not a jax.profiler trace directory)")
  space = xplane_pb2.XSpace()
  space.ParseFromString(paths[-1].read_bytes())
  return space


def _programs(space) -> dict[int, dict[str, tuple[str, str]]]:
  """program_id -> {HLO instruction name: (opcode, jax op_name)} from the metadata plane's HLO protos."""
  from tensorflow.compiler.xla.service import hlo_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for plane in space.planes:
    if plane.name != "/host:metadata":
      continue
    names = {i: m.name for i, m in plane.stat_metadata.items()}
    for meta in plane.event_metadata.values():
      for stat in meta.stats:
        if names.get(stat.metadata_id) != "Hlo Proto":
          continue
        proto = hlo_pb2.HloProto()
        proto.ParseFromString(stat.bytes_value)
        program = re.search(r"\((\d+)\)$", meta.name)
        if program is None:
          continue
        names_ = {ins.name: (ins.opcode, ins.metadata.op_name)
                  for comp in proto.hlo_module.computations for ins in comp.instructions}
        # Kernel names of fused instructions, for kernels replayed inside command buffers.
        names_.update({kernel_name(name): v for name, v in names_.items() if kernel_name(name) not in names_})
        out[int(program.group(1))] = names_
  return out


def kernel_name(instruction: str) -> str:
  """XLA:GPU's kernel name for a fused instruction ('sort.11.1' -> 'sort_11_1')."""
  return re.sub(r"[.\-]", "_", instruction)


def _counted(plane, line) -> bool:
  return plane.name.startswith("/device:GPU") or (plane.name == "/host:CPU" and line.name.startswith("tf_XLA"))


def op_times(space) -> tuple[collections.Counter, int]:
  """({jax op_name (or HLO / kernel name when unknown): seconds}, events counted)."""
  programs = _programs(space)
  times: collections.Counter = collections.Counter()
  counted = 0
  for plane in space.planes:
    names = {i: m.name for i, m in plane.stat_metadata.items()}
    for line in plane.lines:
      if not _counted(plane, line):
        continue
      for event in line.events:
        kernel = plane.event_metadata[event.metadata_id].name
        stats = {}
        for stat in event.stats:
          key = names.get(stat.metadata_id)
          if key in ("hlo_op", "program_id"):
            # String stats are often stored once, as a reference to a stat-metadata name.
            stats[key] = (stat.str_value or names.get(stat.ref_value) if key == "hlo_op"
                          else stat.int64_value or stat.uint64_value)
        if "hlo_op" not in stats:
          continue
        program = programs.get(stats.get("program_id"), {})
        instruction = stats["hlo_op"] if stats["hlo_op"] in program else re.sub(r"__\d+$", "", kernel)
        opcode, op_name = program.get(instruction, ("", ""))
        if opcode in CONTROL_FLOW:
          continue
        if not op_name:   # no jax op behind it (an XLA-made copy) or a library kernel in a command buffer
          op_name = instruction if instruction in program else (
              f"{stats['hlo_op']}: {kernel}" if kernel != stats["hlo_op"] else kernel)
        times[op_name] += event.duration_ps / 1e12
        counted += 1
  return times, counted


def device_busy(space) -> list[tuple[str, float, float, int]]:
  """Per GPU stream with kernels: (name, busy seconds (union of its events), span seconds, events)."""
  out = []
  for plane in space.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      spans = sorted((e.offset_ps, e.offset_ps + e.duration_ps) for e in line.events)
      if len(spans) < 2:
        continue
      busy, end = 0, spans[0][0]
      for a, b in spans:
        busy += max(0, b - max(a, end))
        end = max(end, b)
      out.append((f"{plane.name} {line.name}", busy / 1e12, (end - spans[0][0]) / 1e12, len(spans)))
  return out


def group(op_name: str, depth: int) -> str:
  """'jit(search)/while/body/cond/branch_0_fun/vmap(jit(batched_take))/gather' -> path without the outer jit and
  without transform wrappers, cut to `depth` components after the last loop/branch marker."""
  parts = [p for p in op_name.split("/") if p and not re.fullmatch(r"(jit|vmap|pjit|closed_call)(\(.*\))?", p)]
  return "/".join(parts[:depth + sum(p in ("while", "body", "cond") or p.startswith("branch_") for p in parts)])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", type=pathlib.Path)
  p.add_argument("--depth", type=int, default=3, help="op-name components kept (after loop/branch markers)")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  for trace_dir in args.dirs:
    space = _load(trace_dir)
    times, counted = op_times(space)
    grouped = collections.Counter()
    for op_name, sec in times.items():
      grouped[group(op_name, args.depth)] += sec
    total = sum(times.values())
    print(f"== {trace_dir}: {counted} events, {1e3 * total:.2f} ms summed")
    for name, busy, span, events in device_busy(space):
      print(f"   {name}: busy {1e3 * busy:.2f} ms of a {1e3 * span:.2f} ms span ({events} events, "
            f"{100 * (1 - busy / max(span, 1e-12)):.0f}% idle)")
    for key, sec in grouped.most_common(args.top):
      print(f"{1e3 * sec:9.3f} ms {100 * sec / max(total, 1e-12):5.1f}%  {key}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
