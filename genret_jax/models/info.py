"""`genret model-info --gin_file=...`: parameter counts, FLOPs per token and the sharding of every parameter."""

from __future__ import annotations

import argparse
import json

from genret_jax.gin_utils import add_gin_arguments, parse_gin


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_gin_arguments(parser)
  parser.add_argument("--inputs_length", type=int, default=64, help="Input (query) length for FLOPs.")
  parser.add_argument("--targets_length", type=int, default=16, help="Target (identifier) length for FLOPs.")
  parser.add_argument("--mesh", default="data=1,fsdp=1,model=1",
                      help="Mesh sizes for the sharding table (data=-1 allowed), e.g. data=2,fsdp=2,model=2; "
                           "specs are shown for this shape without needing the devices.")
  parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")


def _parse_mesh(text: str) -> dict[str, int]:
  from genret_jax.errors import InputError
  sizes = {"data": 1, "fsdp": 1, "model": 1}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name.strip() not in sizes:
      raise InputError(f"unknown mesh axis {name!r} (data, fsdp, model)", key="--mesh")
    try:
      size = int(value)
    except ValueError as e:
      raise InputError(f"mesh size {value!r} is not an integer", key="--mesh") from e
    if size == 0 or size < -1:
      raise InputError(f"mesh size {name.strip()}={size}: give a size >= 1, or -1", key="--mesh")
    sizes[name.strip()] = size
  # As partitioning.make_mesh (which `genret train` calls): the table is drawn without devices, so it is not called
  # here, and two -1 axes were shown as a 1x1x1 mesh.
  if sum(s == -1 for s in sizes.values()) > 1:
    raise InputError("at most one mesh axis may be -1, got " + " ".join(f"{k}={v}" for k, v in sizes.items()),
                     key="--mesh")
  return sizes


class _ShapeOnlyMesh:
  """Just enough of a Mesh for `logical_to_mesh_spec`'s divisibility check."""

  def __init__(self, shape: dict[str, int]):
    self.shape = shape


def run(args: argparse.Namespace) -> int:
  from genret_jax.models import accounting, partitioning
  from genret_jax.models.model_api import get_model
  from genret_jax.errors import check_int
  check_int(args.inputs_length, "--inputs_length", 1)
  check_int(args.targets_length, "--targets_length", 1)
  parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
  model = get_model()
  mesh = _ShapeOnlyMesh({k: max(v, 1) for k, v in _parse_mesh(args.mesh).items()})
  info = accounting.summary(model.config, args.inputs_length, args.targets_length)
  rows = partitioning.describe_shardings(model.abstract_params(), mesh)  # type: ignore[arg-type]
  if args.json:
    info["params"] = [{"name": n, "shape": s, "logical": a, "mesh": m} for n, s, a, m in rows]
    print(json.dumps(info, indent=2))
    return 0
  print(f"family: {info['family']}  config: {model.config}")
  print(f"params total: {info['params_total']:,}   non-embedding: {info['params_non_embedding']:,}   "
        f"(embedding matrix vocab x d_model: {info['params_embedding_matrix']:,})")
  print(f"FLOPs (inputs {args.inputs_length}, targets {args.targets_length} tokens):")
  for key in ("forward_flops_per_example", "train_flops_per_token", "decode_init_flops_per_example",
              "decode_step_flops_per_beam"):
    parts = "  ".join(f"{k}={v:.4g}" for k, v in info[key].items())
    print(f"  {key:32s} {parts}")
  print(f"  {'6N per token':32s} {info['six_n_per_token']:.4g}")
  print(f"parameter shardings (mesh {dict(mesh.shape)}, rules partitioning.LOGICAL_AXIS_RULES):")
  width = max(len(r[0]) for r in rows)
  for name, shape, axes, spec in rows:
    print(f"  {name:{width}s}  {str(shape):22s} {str(axes):40s} {spec}")
  return 0
