"""LoRA as a transformation of the parameter tree, so it works for every model family unchanged.

The paper fine-tunes with LoRA (rank 16, alpha 32, on the q and v projections). Instead of adding adapter modules
to each network, adapters are a separate pytree {path: {"a": [.., in, r], "b": [.., r, out]}} and the effective
params are `merge(base, adapters)` computed inside the loss: only the adapters receive gradients and optimizer
state, they checkpoint on their own, and `merge` exports a plain model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from genret_jax.errors import InputError, check_int

Params = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 16
  alpha: float = 32.0
  # Regexes over '/'-joined parameter paths; the defaults hit the q and v projections of both families.
  targets: Sequence[str] = (r"(^|/)(q|v|q_proj|v_proj|query|value)/kernel$",)
  # Number of leading stacked axes (scan-over-layers puts one "layers" axis first).
  stacked_pattern: str = r"(^|/)(layers|scan)(/|$)"
  # How many of the kernel's non-stacked axes are input axes (DenseGeneral kernels are [in, heads, head_dim]).
  input_ndim: int = 1

  def __post_init__(self):
    check_int(self.rank, "LoraConfig.rank")
    check_int(self.input_ndim, "LoraConfig.input_ndim")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise InputError(f"must be a number > 0, got {self.alpha!r}", key="LoraConfig.alpha")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def target_paths(params: Params, cfg: LoraConfig) -> list[str]:
  pats = [re.compile(t) for t in cfg.targets]
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path_str(path)
    if any(p.search(name) for p in pats) and getattr(leaf, "ndim", 0) >= 2:
      found.append(name)
  if not found:
    raise InputError(f"no parameter matches LoRA targets {list(cfg.targets)}", key="LoraConfig.targets")
  return found


def _split_shape(name: str, shape: tuple[int, ...], cfg: LoraConfig) -> tuple[tuple[int, ...], int, int]:
  lead = 1 if re.search(cfg.stacked_pattern, name) and len(shape) > cfg.input_ndim + 1 else 0
  stacked = shape[:lead]
  d_in = int(np.prod(shape[lead:lead + cfg.input_ndim]))
  d_out = int(np.prod(shape[lead + cfg.input_ndim:]))
  return stacked, d_in, d_out


def init_lora(params: Params, cfg: LoraConfig, rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """A ~ Kaiming-uniform (as PEFT), B = 0, so the merged model equals the base model at step 0."""
  adapters = {}
  flat = {_path_str(p): l for p, l in jax.tree_util.tree_flatten_with_path(params)[0]}
  for i, name in enumerate(target_paths(params, cfg)):
    leaf = flat[name]
    stacked, d_in, d_out = _split_shape(name, tuple(leaf.shape), cfg)
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (*stacked, d_in, cfg.rank), jnp.float32, -bound, bound)
    adapters[name] = {"a": a, "b": jnp.zeros((*stacked, cfg.rank, d_out), jnp.float32)}
  return adapters


def merge(params: Params, adapters: dict[str, dict[str, jax.Array]], cfg: LoraConfig) -> Params:
  """W + (alpha / r) · A @ B on every target; other leaves pass through untouched."""

  def apply(path, leaf):
    name = _path_str(path)
    if name not in adapters:
      return leaf
    ad = adapters[name]
    delta = jnp.matmul(ad["a"], ad["b"]) * cfg.scale
    return (leaf.astype(jnp.float32) + delta.reshape(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(apply, params)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
