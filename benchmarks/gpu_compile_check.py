"""Compiles the decode benchmark's searches for an H100 without a GPU (deviceless XLA:GPU), as a pre-flight check
before a device call: a program that does not compile for the card would cost a lent machine's minutes to find.

Needs the CUDA PJRT plugin outside the venv (4.9 GB of CUDA wheels; not a project dependency):

  .venv/bin/python -m pip install --target /tmp/cudaplug "jax-cuda12-plugin[with-cuda]==0.10.2"
  PYTHONPATH=/tmp/cudaplug JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gpu_compile_check.py

For each size, beam and constraint (free, trie; with --ngram also the SciFact n-gram search of gpu_run.sh's
decode_ngram step, with the loop shapes an accelerator gets: `static_searches`) it prints the compile time, how many
while loops the program has and how many of them lack a known trip count (XLA:GPU reads such a loop's predicate back
to the host every round; the search's own loop is one of them by design: it stops early when every beam has
finished) and the sorts XLA emitted (their first operand's shape). Exits 1 when any program fails to compile.
Autotuning and timings need the card: this only shows that the programs compile and how XLA:GPU lowers them
(docs/decoding.md, "Not yet done").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the CUDA plugin then compiles only; no device is opened

import numpy as np  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax.experimental import topologies  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_throughput as bench  # pylint: disable=wrong-import-position
from genret_jax.decoding import SubstringConstraint, TrieConstraint  # pylint: disable=wrong-import-position

# The card's published figures (NVIDIA H100 SXM5 80 GB: 132 SMs of 128 FP32 lanes, compute capability 9.0, 50 MB L2,
# 3.35 TB/s HBM3, 1.98 GHz boost, 228 KB shared memory per SM, 227 KB opt-in per block), as XLA's
# GpuTargetConfigProto text: what XLA:GPU's cost models and kernel emitters read instead of a device query.
H100 = dict(core_count=132, fpus_per_core=128, cc_major=9, cc_minor=0, l2_cache_size=52428800,
            memory_bandwidth=3352320000000, clock_rate_ghz=1.98, device_memory_size=84978434048,
            shared_memory_per_core=233472, shared_memory_per_block_optin=232448, name="NVIDIA H100 80GB HBM3")


def target_config(card: dict) -> str:
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {card['shared_memory_per_core']}
  threads_per_core_limit: 2048
  core_count: {card['core_count']}
  fpus_per_core: {card['fpus_per_core']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {card['memory_bandwidth']}
  l2_cache_size: {card['l2_cache_size']}
  clock_rate_ghz: {card['clock_rate_ghz']}
  device_memory_size: {card['device_memory_size']}
  shared_memory_per_block_optin: {card['shared_memory_per_block_optin']}
  cuda_compute_capability {{ major: {card['cc_major']} minor: {card['cc_minor']} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{card['name']}"
"""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", nargs="*", default=["tiny", "base45m", "llama42m"])
  p.add_argument("--beams", nargs="*", type=int, default=[1, 20])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--ngram", action="store_true", help="also the n-gram search (tiny T5, vocab 8,192, SciFact)")
  return p.parse_args(argv)


def compile_report(txt: str) -> str:
  whiles = re.findall(r"= [^\n]*? while\([^\n]*", txt)
  unknown = sum("known_trip_count" not in w for w in whiles)
  sorts = re.findall(r"= \(?(\w+\[[\d,]*\])[^=\n]*? sort\(", txt)
  return f"{len(whiles)} while loop(s), {unknown} without a known trip count; sorts {sorts}"


def main(args) -> int:
  try:
    topo = topologies.get_topology_desc("genret_check", "cuda", target_config=target_config(H100),
                                        topology="1x1x1")
  except Exception as e:  # pylint: disable=broad-except
    print(f"gpu_compile_check: no CUDA compile target ({type(e).__name__}: {e}); is jax-cuda12-plugin on "
          "PYTHONPATH (see this file's docstring)?", file=sys.stderr)
    return 2
  dev = topo.devices[0]
  sharding = jax.sharding.SingleDeviceSharding(dev)
  spec = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
  inputs = jax.ShapeDtypeStruct((args.batch, bench.INPUT_LEN), jnp.int32, sharding=sharding)
  print(f"target: {H100['name']} (deviceless), jax {jax.__version__}")
  failed = 0

  def check(what, search, params, constraint, beams, **kw):
    nonlocal failed
    t = time.perf_counter()
    try:
      compiled = search.lower(spec(params), inputs, None if constraint is None else spec(constraint),
                              num_beams=beams, **kw).compile()
    except Exception as e:  # pylint: disable=broad-except
      failed += 1
      print(f"{what}: FAILED ({type(e).__name__}: {str(e)[:500]})", flush=True)
      return
    print(f"{what}: compiled in {time.perf_counter() - t:.1f} s; {compile_report(compiled.as_text())}", flush=True)

  for size in args.sizes + (["tiny_v8k"] if args.ngram else []):
    cfg, model, shapes = bench.bench_model(size)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), shapes))   # shapes only: nothing allocated
    if size == "tiny_v8k" and args.ngram:
      docs_text, _ = bench.scifact_texts()
      sp, _ = bench.scifact_spm(None, docs_text, print)
      # The accelerator's loop shapes: the default backend here is the CPU, which would pick the traced ones.
      sc = SubstringConstraint.from_index(bench.scifact_index(sp, docs_text), vocab_size=cfg.vocab_size,
                                          eos_id=bench.EOS, static_searches=True)
      search = bench.make_search(model, 10)
      for beams in args.beams:
        check(f"n-gram tiny_v8k beam {beams} (static searches, keep_history)", search, params, sc, beams,
              keep_history=True)
      continue
    trie = TrieConstraint.build(bench.random_docids(cfg.vocab_size, np.random.default_rng(0)),
                                vocab_size=cfg.vocab_size, eos_id=bench.EOS)
    search = bench.make_search(model, 8)
    for beams in args.beams:
      for name, constraint in (("free", None), ("trie", trie)):
        check(f"{size} beam {beams} {name}", search, params, constraint, beams)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(parse_args()))
