"""optax optimizers and learning-rate schedules, gin-configurable with t5x's defaults (Adafactor, rsqrt decay)."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from genret_jax.errors import InputError, check_float, check_int


@gin.configurable
def make_schedule(kind: str = "rsqrt", base_learning_rate: float = 1e-2, warmup_steps: int = 100,
                  total_steps: int = 1000, end_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup to `base_learning_rate`, then rsqrt / cosine / linear decay, or constant.

  rsqrt follows t5x's `constant * rsqrt_decay`: lr = base * sqrt(warmup / max(step, warmup)).
  """
  base_learning_rate = check_float(base_learning_rate, "make_schedule.base_learning_rate", 0.0)
  warmup_steps = check_int(warmup_steps, "make_schedule.warmup_steps", 0)
  total_steps = max(check_int(total_steps, "make_schedule.total_steps"), warmup_steps + 1)
  end_factor = check_float(end_factor, "make_schedule.end_factor", 0.0)
  warm = optax.linear_schedule(0.0, base_learning_rate, max(warmup_steps, 1))
  if kind == "constant":
    decay = optax.constant_schedule(base_learning_rate)
  elif kind == "rsqrt":
    w = float(max(warmup_steps, 1))
    decay = lambda step: base_learning_rate * jnp.sqrt(w / jnp.maximum(step + warmup_steps, w))
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(base_learning_rate, total_steps - warmup_steps, alpha=end_factor)
  elif kind == "linear":
    decay = optax.linear_schedule(base_learning_rate, base_learning_rate * end_factor, total_steps - warmup_steps)
  else:
    raise InputError(f"unknown schedule {kind!r} (constant, rsqrt, cosine, linear)", key="make_schedule.kind")
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([warm, decay], [warmup_steps])


def decay_mask(params, exclude: Sequence[str] = (r"norm", r"scale$", r"bias$", r"embedding$")):
  """True for parameters that get weight decay: matrices, not norms/biases/embeddings (path regexes)."""
  pats = [re.compile(p) for p in exclude]

  def keep(path, _):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return not any(p.search(name) for p in pats)

  return jax.tree_util.tree_map_with_path(keep, params)


@gin.configurable
def make_optimizer(name: str = "adafactor", learning_rate: float | optax.Schedule | None = None,
                   grad_clip_norm: float | None = 1.0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   decay_exclude: Sequence[str] = (r"norm", r"scale$", r"bias$", r"embedding$"),
                   ) -> optax.GradientTransformation:
  if learning_rate is None:
    lr = make_schedule()
  elif callable(learning_rate):
    lr = learning_rate
  else:
    lr = check_float(learning_rate, "make_optimizer.learning_rate", 0.0)
  for key, value, low in (("grad_clip_norm", grad_clip_norm or 0.0, 0.0), ("weight_decay", weight_decay, 0.0),
                          ("eps", eps, 0.0)):
    check_float(value, f"make_optimizer.{key}", low)
  for key, value in (("b1", b1), ("b2", b2)):
    check_float(value, f"make_optimizer.{key}", 0.0, 1.0)
  chain = []
  if grad_clip_norm:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  if name == "adamw":
    chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=lambda p: decay_mask(p, decay_exclude)))
  elif name == "adafactor":
    # t5x's default optimiser: factored second moments, no momentum; decay applied decoupled with a mask.
    chain.append(optax.adafactor(lr, weight_decay_rate=weight_decay or None,
                                 weight_decay_mask=(lambda p: decay_mask(p, decay_exclude)) if weight_decay else None))
  elif name == "sgd":
    chain.append(optax.sgd(lr))
  else:
    raise InputError(f"unknown optimizer {name!r} (adafactor, adamw, sgd)", key="make_optimizer.name")
  return optax.chain(*chain)


def learning_rate_at(opt_name_or_schedule: Callable | float, step: int) -> float:
  return float(opt_name_or_schedule(step)) if callable(opt_name_or_schedule) else float(opt_name_or_schedule)
