"""A tiny deterministic stand-in for a model's decode contract, for tests and decoding benchmarks.

It follows `tokens_to_logits(cache, tokens [N], step) -> (logits [N, V] float32, cache)` with a
per-row cache (a running hash of the prefix, leading axis = rows), so the logits depend on the whole
prefix as a real decoder's do, and the beam search must gather the cache correctly. A numpy mirror
(`np_logits`) lets reference implementations reproduce the same numbers.

logits(prefix, t, step) = table[step % S, t] + emb[h % H] (+ a low-rank term when `rank` > 0), where
h is the hash of (query seed, prefix tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MOD = 65521  # prime; h * 31 + V stays far below 2^31


def _hash(h, tok):
  return (h * 31 + tok + 1) % _MOD


def fake_tokens_to_logits(params: dict, cache: dict, tokens: jax.Array, step: jax.Array):
  """The decode contract with params explicit, so one compiled search serves every random model."""
  h = _hash(cache["h"], tokens)
  logits = (params["table"][step % params["table"].shape[0], tokens]
            + params["emb"][h % params["emb"].shape[0]])
  if "a" in params:
    logits = logits + params["a"][tokens] @ params["w"]
  return logits.astype(jnp.float32), {"h": h}


class FakeModel:
  """Deterministic prefix-dependent logits (see the module docstring)."""

  def __init__(self, vocab_size: int, *, seed: int = 0, num_step_tables: int = 4, hash_size: int = 97,
               scale: float = 2.0, rank: int = 0):
    rng = np.random.default_rng(seed)
    v = vocab_size
    self.vocab_size = v
    self.table = (rng.standard_normal((num_step_tables, v, v)) * scale).astype(np.float32)
    self.emb = (rng.standard_normal((hash_size, v)) * scale).astype(np.float32)
    self.rank = rank
    if rank:
      self.a = (rng.standard_normal((v, rank)) / np.sqrt(rank)).astype(np.float32)
      self.w = (rng.standard_normal((rank, v)) * scale).astype(np.float32)
    self.params = jax.tree.map(jnp.asarray, {"table": self.table, "emb": self.emb,
                                             **({"a": self.a, "w": self.w} if rank else {})})

  def decode_init(self, inputs: np.ndarray) -> tuple[dict, jax.Array]:
    """inputs [B, Lin] int -> (cache {'h': [B]}, first_tokens [B] = 0)."""
    inputs = np.asarray(inputs, np.int64)
    h = np.zeros(inputs.shape[0], np.int64)
    for j in range(inputs.shape[1]):
      h = _hash(h, inputs[:, j])
    return {"h": jnp.asarray(h, jnp.int32)}, jnp.zeros((inputs.shape[0],), jnp.int32)

  def tokens_to_logits(self, cache: dict, tokens: jax.Array, step: jax.Array):
    return fake_tokens_to_logits(self.params, cache, tokens, step)

  # --- numpy mirror for reference searches ---

  def np_init(self, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(self.decode_init(inputs)[0]["h"], np.int64)

  def np_step(self, h: int, tok: int, step: int) -> tuple[np.ndarray, int]:
    """(log-probs [V] float64, new hash) for one row."""
    h = int(_hash(h, tok))
    logits = self.table[step % self.table.shape[0], tok] + self.emb[h % self.emb.shape[0]]
    if self.rank:
      logits = logits + self.a[tok] @ self.w
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum()), h
