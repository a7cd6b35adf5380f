"""Train-step throughput: our jit-compiled train step vs Hugging Face PyTorch, same config, same run.

For each (family, rung) the script builds
* ours: `genret_jax.models.model_api` wrapper of the rung's config (fp32 compute), optax AdamW, and
  `genret_jax.training.trainer.make_train_step(model, tx)` under `jax.jit(..., donate_argnums=0)` on one device;
* theirs: `transformers.T5ForConditionalGeneration` / `LlamaForCausalLM` with the identical architecture (the
  parameter counts are checked to match), torch AdamW with the same lr / betas / eps / weight decay / clipping,
  eager mode, `attn_implementation="sdpa"`, fp32;
on the same synthetic batch shaped like seqio feature-converter output (T5: `EncDecFeatureConverter`; LLaMA:
PrefixLM `DecoderFeatureConverter`, loss on the targets only). Both losses are the token-weighted cross-entropy
over `decoder_loss_weights`, computed from full-vocabulary float32 logits.

Timing: compile / warm up both outside the timed region, then alternate ours and theirs in chunks
(`--repeats` chunks of `--seconds / --repeats` each per side) so the two share the machine's noise; tokens/s is
the median over chunks. A token is one input or target position of the batch (B x (inputs + targets)), counted
the same way on both sides and by `accounting.train_flops_per_token`, so MFU = tokens/s x FLOPs/token / peak,
with the peak the best fp32 matmul rate measured in this run by jax and by torch.

  python benchmarks/train_throughput.py --family both --rungs tiny,small --device cpu

writes (replaces) the "## Train throughput" section of docs/benchmarks.md (`--no_write_docs` to skip).
On `--device gpu` torch runs on CUDA when it has it, otherwise on the CPU (said in the table and the doc).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import os
import platform
import re
import statistics
import sys
import time
import types
from typing import Any, Callable

from _common import (configure_host_malloc, cpu_model, jax_matmul_peak, time_reps, torch_matmul_peak,
                     write_subsection)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_PATH = os.path.join(REPO, "docs", "benchmarks.md")
SECTION = "## Train throughput"
GIN_DIRS = {"t5": "t5_1_1", "llama": "llama"}

# Used only where the CPU-ladder gin of a rung (gin_configs/models/{t5_1_1,llama}/<rung>.gin) does not exist yet:
# the two families matched in non-embedding parameters rung by rung, vocabulary of the tasks' SentencePiece size.
FALLBACK_RUNGS: dict[str, dict[str, dict[str, Any]]] = {
    "t5": {
        "tiny": dict(vocab_size=2048, d_model=64, num_heads=4, head_dim=16, d_ff=128,
                     num_encoder_layers=2, num_decoder_layers=2),
        "small": dict(vocab_size=2048, d_model=256, num_heads=4, head_dim=64, d_ff=512,
                      num_encoder_layers=4, num_decoder_layers=4),
    },
    "llama": {
        "tiny": dict(vocab_size=2048, d_model=64, num_layers=4, num_heads=4, num_kv_heads=4, d_ff=192),
        "small": dict(vocab_size=2048, d_model=256, num_layers=8, num_heads=4, num_kv_heads=4, d_ff=640),
    },
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--family", choices=["t5", "llama", "both"], default="both")
  p.add_argument("--rungs", default="r0,r2",
                 help="comma-separated rungs: r0..r5 = CPU ladder (gin_configs/models/<family>/cpu_ladder/rN.gin; "
                      "r0 ~0.13M and r2 ~2M non-embedding params are the tiny and small CPU rungs), other names "
                      "= gin_configs/models/<family>/<name>.gin (e.g. tiny, small), or .gin paths")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=64, help="inputs length (T5 encoder / LLaMA prefix)")
  p.add_argument("--target_len", type=int, default=16, help="targets length (T5 decoder / LLaMA suffix)")
  p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per side per rung (>= 5 recommended)")
  p.add_argument("--repeats", type=int, default=3, help="alternating timed chunks per side")
  p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weight_decay", type=float, default=0.01)
  p.add_argument("--grad_clip", type=float, default=1.0)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may use)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--full_logits", action="store_true",
                 help="LLaMA: ours computes logits at every position like HF (default: only at the targets)")
  p.add_argument("--no_write_docs", action="store_true")
  p.add_argument("--doc", default=DOC_PATH)
  return p.parse_args(argv)


# ---- environment (before jax is imported) --------------------------------------------------------------------

def configure_environment(args) -> int:
  cores = args.threads or len(os.sched_getaffinity(0))
  args.host_malloc = configure_host_malloc()
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # fp32 on both sides, also on GPUs (no TF32 in jax's default precision).
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  return cores


def import_trainer():
  """`genret_jax.training.trainer`; where seqio / TensorFlow are absent (a bare GPU image) they are stubbed,
  since the train step never touches the data pipeline that imports them."""
  try:
    from genret_jax.training import trainer
    return trainer, []
  except ModuleNotFoundError as e:
    stubbed = []
    for name in ("seqio", "tensorflow", "clu", "clu.metric_writers"):
      try:
        __import__(name)
      except ModuleNotFoundError:
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo find_spec()s these names
        sys.modules[name] = stub
        stubbed.append(name)
    if not stubbed:
      raise e
    from genret_jax.training import trainer
    return trainer, stubbed


# ---- configs -------------------------------------------------------------------------------------------------

def rung_path(family: str, rung: str) -> str:
  """`r0`..`r5` are the CPU ladder (`<family>/cpu_ladder/rN.gin`), other names `<family>/<name>.gin`
  (`tiny`, `small`, `7b`, ...), or a path to a gin file."""
  if rung.endswith(".gin"):
    return rung
  base = os.path.join(REPO, "gin_configs", "models", GIN_DIRS[family])
  if re.fullmatch(r"r\d+", rung):
    return os.path.join(base, "cpu_ladder", f"{rung}.gin")
  return os.path.join(base, f"{rung}.gin")


def load_config(family: str, rung: str):
  """(config, source): the rung's gin config when present, else the built-in fallback dims; fp32, no dropout."""
  from genret_jax.models.llama import LlamaConfig
  from genret_jax.models.t5 import T5Config
  cls = T5Config if family == "t5" else LlamaConfig
  path = rung_path(family, rung)
  config, source = None, None
  if os.path.exists(path):
    import gin
    import genret_jax.models.model_api  # noqa: F401  (registers the configurables)
    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(REPO, "gin_configs"))
    gin.add_config_file_search_path(REPO)
    try:
      gin.parse_config_files_and_bindings([path], ["DROPOUT_RATE = 0.0"], skip_unknown=True)
      config = cls()
      source = os.path.relpath(path, REPO)
    except Exception as e:  # a gin that fails to parse here must not stop the other rungs
      print(f"[warn] {path}: {type(e).__name__}: {e}; using the built-in dims", file=sys.stderr)
    finally:
      gin.clear_config()
  if config is None:
    if rung not in FALLBACK_RUNGS[family]:
      raise SystemExit(f"no gin for rung {rung!r} of {family} ({path}) and no built-in dims")
    config = cls(**FALLBACK_RUNGS[family][rung])
    source = "built-in (no ladder gin yet)"
  return dataclasses.replace(config, dtype="float32", param_dtype="float32", dropout_rate=0.0,
                             remat_policy="none"), source


def hf_config(config):
  import transformers
  if config.family == "t5":
    return transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.d_ff,
        num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj=("gated-gelu" if tuple(config.mlp_activations) == ("gelu", "linear")
                           else "gated-" + config.mlp_activations[0] if len(config.mlp_activations) == 2
                           else config.mlp_activations[0]),
        tie_word_embeddings=config.tie_word_embeddings, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, use_cache=False)
  return transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
      rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings, attention_dropout=0.0,
      max_position_embeddings=4096, hidden_act="silu", use_cache=False, pad_token_id=0)


# ---- synthetic seqio-shaped batches ------------------------------------------------------------------------------

def make_batch(family: str, batch: int, seq_len: int, target_len: int, vocab: int, seed: int):
  """Full-length rows (no padding), as `EncDecFeatureConverter` / PrefixLM `DecoderFeatureConverter` emit them."""
  import numpy as np
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab, (batch, seq_len), dtype=np.int32)
  targets = rng.integers(2, vocab, (batch, target_len), dtype=np.int32)
  targets[:, -1] = 1  # EOS

  def shift_right(x):
    return np.concatenate([np.zeros((x.shape[0], 1), np.int32), x[:, :-1]], axis=1)

  if family == "t5":
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": shift_right(targets),
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}
  full = np.concatenate([inputs, targets], axis=1)
  weights = np.concatenate([np.zeros_like(inputs), np.ones_like(targets)], axis=1)
  return {"decoder_input_tokens": shift_right(full), "decoder_target_tokens": full,
          "decoder_loss_weights": weights,
          "decoder_causal_attention": np.concatenate([np.ones_like(inputs), np.zeros_like(targets)], axis=1)}


# ---- our side ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Side:
  name: str
  step: Callable[[int], None]   # runs n steps and waits for them to finish
  num_params: int


def build_ours(config, batch_np, args, trainer) -> Side:
  import jax
  import jax.numpy as jnp
  from genret_jax.models.model_api import model_for_config
  from genret_jax.training import optimizers

  device = jax.devices()[0]
  # LLaMA: logits only at the target positions (`DecoderOnlyModel.loss_positions`), what the trainer's prefix-LM
  # runs use; HF's model has no such option and projects every position.
  model = model_for_config(config, loss_positions=0 if args.full_logits else args.target_len)
  tx = optimizers.make_optimizer(name="adamw", learning_rate=args.lr, grad_clip_norm=args.grad_clip,
                                 weight_decay=args.weight_decay)
  batch_feats = {k: v for k, v in batch_np.items() if k != "decoder_causal_attention"}
  shapes = {k: v.shape for k, v in batch_feats.items()}
  with jax.default_device(device):
    params = jax.jit(lambda r: model.init(r, shapes))(jax.random.key(args.seed))
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  state = jax.device_put(state, device)
  batch = jax.device_put(batch_feats, device)
  rng = jax.device_put(jax.random.key(args.seed + 1), device)
  step_fn = jax.jit(trainer.make_train_step(model, tx, dropout=False), donate_argnums=0)
  holder = {"state": state}
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))

  def run(n: int) -> None:
    s = holder["state"]
    m = None
    for _ in range(n):
      s, m = step_fn(s, batch, None, rng)
    jax.block_until_ready((s, m))
    holder["state"] = s

  return Side("ours (jax)", run, num_params)


# ---- Hugging Face side -------------------------------------------------------------------------------------------

def build_hf(config, batch_np, args, torch_device: str) -> Side:
  import torch
  import transformers
  torch.manual_seed(args.seed)
  cfg = hf_config(config)
  cls = transformers.T5ForConditionalGeneration if config.family == "t5" else transformers.LlamaForCausalLM
  try:
    model = cls(cfg, attn_implementation="sdpa")
  except (TypeError, ValueError):
    model = cls(cfg)
  if config.family == "t5" and not config.tie_word_embeddings and model.lm_head.weight is model.shared.weight:
    # transformers 5 always ties T5's lm_head to `shared` (the config forces tie_word_embeddings=True); T5 v1.1
    # (and ours) has an untied output projection, so give the head its own matrix.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  model = model.to(torch_device, dtype=torch.float32).train()
  # Weight decay on the same parameters as ours (`optimizers.decay_mask`): matrices, not norms / embeddings.
  no_decay = re.compile(r"norm|embed|shared|relative_attention_bias")
  groups = [{"params": [p for n, p in model.named_parameters() if not no_decay.search(n)],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in model.named_parameters() if no_decay.search(n)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
  t = {k: torch.as_tensor(v, dtype=torch.long, device=torch_device) for k, v in batch_np.items()}
  targets, weights = t["decoder_target_tokens"], t["decoder_loss_weights"].to(torch.float32)
  params = [p for p in model.parameters()]

  def one_step():
    opt.zero_grad(set_to_none=True)
    if config.family == "t5":
      logits = model(input_ids=t["encoder_input_tokens"],
                     attention_mask=(t["encoder_input_tokens"] > 0).long(),
                     decoder_input_ids=t["decoder_input_tokens"]).logits
    else:
      logits = model(input_ids=t["decoder_input_tokens"]).logits
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           reduction="none")
    loss = (ce * weights.reshape(-1)).sum() / weights.sum().clamp(min=1.0)
    loss.backward()
    if args.grad_clip:
      torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    opt.step()
    return loss

  def run(n: int) -> None:
    loss = None
    for _ in range(n):
      loss = one_step()
    loss = loss.detach()
    if torch_device.startswith("cuda"):
      torch.cuda.synchronize()
    float(loss)

  attn = getattr(model.config, "_attn_implementation", None) or "default"
  return Side(f"HF torch ({torch_device}, attention {attn})", run, sum(p.numel() for p in params))


# ---- measurement -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RungResult:
  family: str
  rung: str
  source: str
  params: int
  non_embedding: int
  batch: int
  tokens_per_step: int
  ours_tok_s: float
  hf_tok_s: float
  ours_chunks: list[float]
  hf_chunks: list[float]
  flops_per_token: float
  ours_mfu: float
  hf_mfu: float
  hf_side: str = ""

  @property
  def ratio(self) -> float:
    """Median over repeats of the two sides' tokens/s ratio within one repeat (the chunks of a repeat run back to
    back): this machine switches between a fast and a ~1.6x slower state for seconds at a time, and a ratio of
    the two medians could pair a fast chunk of one side with a slow one of the other (decode_throughput's
    `round_ratio`, session 10)."""
    return statistics.median(o / h for o, h in zip(self.ours_chunks, self.hf_chunks))


def measure_rung(family, rung, args, trainer, torch_device, peak) -> RungResult:
  from genret_jax.models import accounting
  config, source = load_config(family, rung)
  batch_np = make_batch(family, args.batch, args.seq_len, args.target_len, config.vocab_size, args.seed)
  tokens_per_step = args.batch * (args.seq_len + args.target_len)
  sides = [build_ours(config, batch_np, args, trainer), build_hf(config, batch_np, args, torch_device)]
  if sides[0].num_params != sides[1].num_params:
    print(f"[warn] {family}/{rung}: parameter counts differ: ours {sides[0].num_params:,} vs HF "
          f"{sides[1].num_params:,}", file=sys.stderr)
  chunk = args.seconds / args.repeats
  steps = []
  for side in sides:   # compile + warm up outside the timed region, then size the chunks
    t0 = time.perf_counter()
    side.step(2)
    t1 = time.perf_counter()
    per_step = time_reps(side.step, min(0.5, chunk / 2))
    steps.append(max(1, round(chunk / per_step)))
    print(f"  {family}/{rung} {side.name}: warm-up (compile) {t1 - t0:.1f} s, {per_step * 1e3:.1f} ms/step",
          flush=True)
  rates: list[list[float]] = [[], []]
  for r in range(args.repeats):
    order = (0, 1) if r % 2 == 0 else (1, 0)   # alternate who goes first
    for i in order:
      t0 = time.perf_counter()
      sides[i].step(steps[i])
      rates[i].append(steps[i] * tokens_per_step / (time.perf_counter() - t0))
  ours, hf = statistics.median(rates[0]), statistics.median(rates[1])
  fpt = accounting.train_flops_per_token(config, args.seq_len, args.target_len).total
  counts = accounting.count_params(config)
  return RungResult(family, rung, source, counts.total, counts.non_embedding, args.batch, tokens_per_step,
                    ours, hf, rates[0], rates[1], fpt, ours * fpt / peak, hf * fpt / peak, sides[1].name)


# ---- report -----------------------------------------------------------------------------------------------------

def fmt_params(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def table(results: list[RungResult], seq_len: int, target_len: int, family: str) -> str:
  shape = lambda r: (f"{r.batch}x({seq_len}+{target_len})" if r.family == "t5"
                     else f"{r.batch}x{seq_len + target_len}")
  lines = ["| family | rung | params (non-emb) | batch x len | ours tok/s | HF tok/s | ours / HF | our MFU | HF MFU |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r.family} | {r.rung} | {fmt_params(r.params)} ({fmt_params(r.non_embedding)}) | {shape(r)} "
                 f"| {r.ours_tok_s:,.0f} | {r.hf_tok_s:,.0f} | **{r.ratio:.2f}x** | {100 * r.ours_mfu:.1f}% "
                 f"| {100 * r.hf_mfu:.1f}% |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  cores = configure_environment(args)
  t_start = time.perf_counter()
  load_start = os.getloadavg()
  import jax
  import torch
  import transformers
  torch.set_num_threads(cores)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  # The HF model classes load before any stub goes in (their import walks the installed modules).
  transformers.T5ForConditionalGeneration, transformers.LlamaForCausalLM  # noqa: B018
  trainer, stubbed = import_trainer()
  if args.device == "gpu":
    if jax.default_backend() != "gpu":
      raise SystemExit(f"--device gpu but jax's backend is {jax.default_backend()}")
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  else:
    torch_device = "cpu"
  if args.device == "gpu" and torch_device == "cpu":
    print("[note] torch has no CUDA here: the HF side runs on the CPU", file=sys.stderr)

  families = ["t5", "llama"] if args.family == "both" else [args.family]
  rungs = [r for r in args.rungs.split(",") if r]
  n_peak = 2048 if args.device == "gpu" else 1024
  peaks = {"jax": jax_matmul_peak(n_peak), "torch": torch_matmul_peak(n_peak, torch_device)}
  results = []

  def report(results, final: bool) -> None:
    peak = max(peaks.values())
    for r in results:   # MFU against the final (best) peak reading
      r.ours_mfu, r.hf_mfu = r.ours_tok_s * r.flops_per_token / peak, r.hf_tok_s * r.flops_per_token / peak

    tbl = table(results, args.seq_len, args.target_len, args.family)
    if final:
      print(tbl)
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()
    if args.device == "gpu":
      dev = jax.devices()[0].device_kind
      machine = f"GPU: {dev} (jax); torch on {torch_device}" + (
          f" ({torch.cuda.get_device_name(0)})" if torch_device == "cuda" else " (torch has no CUDA: HF on CPU)")
    else:
      machine = f"CPU: {cpu_model()}, {cores} cores (jax and torch each use all {cores})"
    cmd = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sources = "; ".join(sorted({f"{r.family}/{r.rung}: {r.source}" for r in results}))
    hf_sides = ", ".join(sorted({r.hf_side for r in results}))
    notes = [
        f"Machine: {machine}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end (on a shared "
        "machine read the ratio, measured interleaved; absolute tokens/s move with the load).",
        f"Versions: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}.",
        f"fp32 compute and params on both sides; AdamW (lr {args.lr}, betas 0.9/0.999, eps 1e-8, weight decay "
        f"{args.weight_decay} on matrices only), global-norm clipping {args.grad_clip}; no dropout, no z-loss. Ours: "
        "`trainer.make_train_step` under `jax.jit(donate_argnums=0)` on one device. HF: eager PyTorch "
        f"({hf_sides}), loss from full float32 logits exactly as ours.",
        f"Synthetic full-length batches shaped like seqio feature-converter output (T5: encoder {args.seq_len} + "
        f"decoder {args.target_len}; LLaMA prefix-LM: {args.seq_len} + {args.target_len} concatenated, loss on the "
        f"targets). tokens/s counts every input and target position; median of {args.repeats} alternating chunks "
        f"of {args.seconds / args.repeats:.1f} s per side; ours / HF is the median of the {args.repeats} per-repeat "
        "ratios (one chunk per side, back to back), so it can differ from the ratio of the two medians.",
        "MFU = tokens/s x training FLOPs/token (`accounting.train_flops_per_token`) / peak; peak = best fp32 "
        f"{n_peak}^3 matmul measured in this run: jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch "
        f"{peaks['torch'] / 1e9:.1f} GFLOP/s.",
        f"Configs: {sources}; {args.host_malloc}." + (f" Stubbed for import (absent here): {', '.join(stubbed)}." if stubbed else ""),
        f"Whole run: {elapsed:.0f} s." if final else
        f"Partial: written after {len(results)} of {len(families) * len(rungs)} rungs ({elapsed:.0f} s); the run "
        "did not reach its end (e.g. stopped at a lent GPU's time limit).",
    ]
    body = ("Command (from the repository root, with the venv's python):\n\n```\n" + cmd + "\n```\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n" + tbl + "\n")
    if not args.no_write_docs:
      heading = (f"### GPU: {jax.devices()[0].device_kind}" if args.device == "gpu"
                 else f"### CPU: {cpu_model()}, {cores} cores")
      write_subsection(args.doc, SECTION, heading, body,
                       intro="Written by `benchmarks/train_throughput.py`: one subsection per machine, each replaced "
                             "by the next run on that machine.")
      if final:
        print(f"wrote {os.path.relpath(args.doc, REPO)} ({SECTION})")

  for fam in families:
    for rung in rungs:
      # Re-measure the peak around each rung: on a shared machine the best of all readings is the machine's.
      res = measure_rung(fam, rung, args, trainer, torch_device, max(peaks.values()))
      peaks["jax"] = max(peaks["jax"], jax_matmul_peak(n_peak))
      peaks["torch"] = max(peaks["torch"], torch_matmul_peak(n_peak, torch_device))
      results.append(res)
      print(f"{fam}/{rung}: ours {res.ours_tok_s:,.0f} tok/s  HF {res.hf_tok_s:,.0f} tok/s  "
            f"ratio {res.ratio:.2f}x  chunks ours {[round(x) for x in res.ours_chunks]} "
            f"HF {[round(x) for x in res.hf_chunks]}", flush=True)
      report(results, final=False)   # a run cut short (a lent GPU's time limit) still leaves its rungs
  report(results, final=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
