"""CGL scoring throughput: our batched, jitted scorer vs the reference's way, same weights, same sequences.

Workload: the CGL sequences of `--queries` queries x (1 positive + `--negatives` negatives) documents x
`--spans` spans (the paper: 257 x 10 per query); query and span token ids are synthetic (random ids, lengths
drawn like Cranfield queries / 10-word spans: `--query_len`, `--span_len` tokens plus EOS) since only the shapes
matter for speed.

* ours: `genret_jax.scaling.scoring.PairScorer` (`--batch` target rows per jitted forward in slots of `--slot_rows`
  rows continuing one query, which is encoded and its cross-attention keys/values projected once per slot; the
  vocabulary projection chunked, `layers.projected_token_stats`; length buckets, padding masked), fp32, all
  devices of the host;
* reference way (SLGR_BEHAVIOUR.md §5.2, T5): one Hugging Face `T5ForConditionalGeneration` forward per
  (query, document) on a batch of that document's spans, the query repeated per row with an attention mask,
  labels padded with -100 (the reference padded with 0; that only changes the numbers, not the speed), eager
  PyTorch fp32 under `torch.inference_mode()`, weights exported from ours by `genret_jax.models.hf_convert`.
Both sides' NLLs are compared on the first pairs (they must agree) before anything is timed.

Timing: warm both sides, then alternate `--repeats` chunks of ours and theirs (the machine is shared, so the
two sides see the same noise); sequences/s is the median over chunks, and the ratio is taken chunk by chunk.
FLOP/s counts the work each side must do with `accounting.forward_flops_per_example`: the reference runs the
encoder for every sequence; ours runs it once per query per batch slot, so its count is
decoder-per-sequence + encoder / (sequences per query). The peak is the best fp32 n^3 matmul rate measured in
this run (jax and torch, re-measured between rungs).

  python benchmarks/cgl_throughput.py --rungs r0,r5,base45m --threads 2

writes (replaces) the "## CGL throughput" section of docs/benchmarks.md (`--no_write_docs` to skip).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import (T5_BENCH_SIZES, bench_t5_config, configure_host_malloc, cpu_model, jax_matmul_peak,
                     torch_matmul_peak, write_section)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_PATH = os.path.join(REPO, "docs", "benchmarks.md")
SECTION = "## CGL throughput"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rungs", default="r0,r5,base45m",
                 help="T5 CPU-ladder rungs (gin_configs/models/t5_1_1/cpu_ladder) or _common.T5_BENCH_SIZES names; "
                      "base45m is the issue's ~40M rung")
  p.add_argument("--queries", type=int, default=2)
  p.add_argument("--negatives", type=int, default=256)
  p.add_argument("--spans", type=int, default=10)
  p.add_argument("--query_len", type=int, default=20, help="query tokens before EOS")
  p.add_argument("--span_len", type=int, default=14, help="span tokens before EOS")
  p.add_argument("--batch", type=int, default=512, help="our target rows per forward pass")
  p.add_argument("--slot_rows", type=int, default=64, help="our target rows per input slot (PairScorer)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ref_seconds", type=float, default=4.0, help="seconds of reference scoring per chunk")
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                 help="gpu: jax's default accelerator and torch on CUDA, written as a '### GPU: <card>' subsection")
  p.add_argument("--no_write_docs", action="store_true")
  return p.parse_args(argv)


def load_t5(rung: str):
  """A CPU-ladder rung (r0..r5, its gin file) or a shared benchmark size (`_common.T5_BENCH_SIZES`: base45m)."""
  import gin

  from genret_jax import gin_utils
  from genret_jax.models import model_api
  if rung in T5_BENCH_SIZES:
    return model_api.EncoderDecoderModel(bench_t5_config(rung))
  gin_utils.parse_gin([f"models/t5_1_1/cpu_ladder/{rung}.gin"], [])
  model = model_api.get_model()
  gin.clear_config()
  return model


def workload(args, vocab: int):
  import numpy as np
  rng = np.random.default_rng(0)
  queries = [list(rng.integers(3, vocab, args.query_len)) + [1] for _ in range(args.queries)]
  docs_per_query = args.negatives + 1
  pairs = []  # (query index, [span token lists])
  for q in range(args.queries):
    for _ in range(docs_per_query):
      spans = [list(rng.integers(3, vocab, args.span_len - int(rng.integers(0, 3)))) + [1]
               for _ in range(args.spans)]
      pairs.append((q, spans))
  return queries, pairs


def hf_model(model, params, device):
  import numpy as np
  import torch
  import transformers

  from genret_jax.models import hf_convert
  cfg = transformers.T5Config(**{k: v for k, v in hf_convert.hf_config_from(model.config).items()
                                 if k != "architectures"})
  hf = transformers.T5ForConditionalGeneration(cfg)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in hf_convert.params_to_hf(params, model.config).items()}
  missing, unexpected = hf.load_state_dict(sd, strict=False)
  missing = [m for m in missing if not m.endswith("embed_tokens.weight")]  # tied to `shared`
  if missing or unexpected:
    raise RuntimeError(f"HF export mismatch: missing {missing}, unexpected {unexpected}")
  return hf.eval().to(device)


def reference_pair_nll(hf, query, spans):
  """One forward for one (query, document): per-span summed NLL (as the reference batches it)."""
  import torch
  dev = hf.device
  n = len(spans)
  width = max(len(s) for s in spans)
  labels = torch.full((n, width), -100, dtype=torch.long)
  for i, s in enumerate(spans):
    labels[i, :len(s)] = torch.tensor(s)
  ids = torch.tensor([query] * n, dtype=torch.long)
  labels, ids = labels.to(dev), ids.to(dev)
  with torch.inference_mode():
    logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).logits
    logp = torch.log_softmax(logits.float(), -1)
    mask = labels >= 0
    tok = torch.gather(logp, -1, labels.clamp(min=0)[..., None])[..., 0]
    return (-(tok * mask).sum(-1)).cpu().numpy()   # the copy back waits for the GPU


def measure_rung(rung: str, args, device) -> dict:
  import jax
  import numpy as np

  from genret_jax.models import accounting
  from genret_jax.scaling import scoring
  model = load_t5(rung)
  cfg = model.config
  params = jax.jit(model.init)(jax.random.key(0))
  queries, pairs = workload(args, cfg.vocab_size)
  flat_t, flat_q = [], []
  for q, spans in pairs:
    flat_t += spans
    flat_q += [q] * len(spans)
  scorer = scoring.PairScorer(model, params, batch_size=args.batch,
                              inputs_per_batch=max(1, args.batch // args.slot_rows))
  hf = hf_model(model, params, device)

  # Agreement on the first pairs, and warm-up of both sides.
  ours = scorer.score(queries, flat_t, input_index=flat_q)
  theirs = np.concatenate([reference_pair_nll(hf, queries[q], spans) for q, spans in pairs[:3]])
  err = float(np.max(np.abs(ours.nll[:theirs.size] - theirs) / np.maximum(theirs, 1e-6)))
  if err > 1e-3:
    raise RuntimeError(f"{rung}: our NLLs differ from the HF model's (max rel err {err:.2e})")

  ours_rates, ref_rates, ratios = [], [], []
  cursor = 0
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    out = scorer.score(queries, flat_t, input_index=flat_q)
    ours_rate = out.nll.size / (time.perf_counter() - t0)
    n_seq, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.ref_seconds:
      q, spans = pairs[cursor % len(pairs)]
      reference_pair_nll(hf, queries[q], spans)
      n_seq += len(spans)
      cursor += 1
    ref_rate = n_seq / (time.perf_counter() - t0)
    ours_rates.append(ours_rate)
    ref_rates.append(ref_rate)
    ratios.append(ours_rate / ref_rate)

  lin, lt = args.query_len + 1, args.span_len + 1
  per_seq_plain = accounting.forward_flops_per_example(cfg, lin, lt).total
  encoder = accounting.forward_flops_per_example(cfg, lin, 0).total
  slots = sum(-(-flat_q.count(q) // scorer.slot_rows) for q in range(len(queries)))  # encoder runs
  per_seq_ours = per_seq_plain - encoder + encoder * slots / len(flat_t)
  n = accounting.count_params(cfg)
  return {"rung": rung, "params": n.total, "non_embedding": n.non_embedding, "sequences": len(flat_t),
          "ours_seq_s": statistics.median(ours_rates), "ref_seq_s": statistics.median(ref_rates),
          "ratio": statistics.median(ratios), "ours_flops_per_seq": per_seq_ours,
          "ref_flops_per_seq": per_seq_plain, "max_rel_err": err,
          "padding": ours.stats["target_padding_fraction"], "batches": ours.stats["num_batches"]}


def fmt(n: float) -> str:
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def render(results, peak, peaks, args, machine: str, n_peak: int) -> str:
  import jax
  import torch
  rows = ["| rung | params (non-emb.) | ours seq/s | reference seq/s | ratio | ours GFLOP/s (% of peak) | "
          "reference GFLOP/s (% of peak) |", "|---|---|---|---|---|---|---|"]
  for r in results:
    of, rf = r["ours_seq_s"] * r["ours_flops_per_seq"], r["ref_seq_s"] * r["ref_flops_per_seq"]
    rows.append(f"| {r['rung']} | {fmt(r['params'])} ({fmt(r['non_embedding'])}) | {r['ours_seq_s']:.0f} | "
                f"{r['ref_seq_s']:.0f} | {r['ratio']:.1f}x | {of / 1e9:.1f} ({100 * of / peak:.0f}%) | "
                f"{rf / 1e9:.1f} ({100 * rf / peak:.0f}%) |")
  cmd = "python benchmarks/cgl_throughput.py " + " ".join(sys.argv[1:])
  return "\n".join([
      f"`{cmd}` on {machine}, jax {jax.__version__} ({jax.device_count()} {jax.default_backend()} device(s)), "
      f"torch {torch.__version__} ({torch.get_num_threads()} threads).", "",
      f"Workload: {args.queries} queries x {args.negatives + 1} documents x {args.spans} spans (T5, fp32), "
      f"queries {args.query_len}+1 tokens, spans ~{args.span_len}+1 tokens. Ours: `scoring.PairScorer`, "
      f"{args.batch} rows per jitted forward in slots of {args.slot_rows} rows of one query (its encoder output "
      "and cross-attention keys/values computed once per slot), vocabulary projected in chunks. Reference way: "
      "one HF forward per (query, document) with the same weights (exported by `hf_convert`); NLLs agree to "
      f"{max(r['max_rel_err'] for r in results):.1e} relative. Medians of {args.repeats} interleaved chunks; "
      "ratio = median of per-chunk ratios.", "",
      *rows, "",
      f"Peak = best fp32 {n_peak}^3 matmul measured in this run: jax {peaks['jax'] / 1e9:.1f}, torch "
      f"{peaks['torch'] / 1e9:.1f} GFLOP/s. FLOPs per sequence from `accounting.forward_flops_per_example`; "
      "ours counts the encoder once per slot (what it executes), the reference once per sequence.", ""])


def main(argv=None) -> int:
  args = parse_args(argv)
  host_malloc_note = configure_host_malloc()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:   # fp32 on both sides: no TF32 matmuls in jax's default precision nor in torch
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  import jax
  import torch
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device("cpu")
  gpu_card = None
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  machine = f"{cpu_model()} ({os.cpu_count()} logical CPUs; load average {load} at start; {host_malloc_note})"
  if args.device == "gpu":
    if jax.default_backend() == "cpu":
      raise SystemExit("--device gpu but jax found no accelerator")
    if not torch.cuda.is_available():
      raise SystemExit("--device gpu but torch has no CUDA here")
    device = torch.device("cuda")
    gpu_card = f"{jax.devices()[0].device_kind} (jax) / {torch.cuda.get_device_name(0)} (torch)"
    machine = f"GPU {gpu_card}, host {cpu_model()}"
  n_peak = 4096 if args.device == "gpu" else 1024
  peaks = {"jax": jax_matmul_peak(n_peak), "torch": torch_matmul_peak(n_peak, str(device))}
  results = []
  for rung in args.rungs.split(","):
    results.append(measure_rung(rung, args, device))
    r = results[-1]
    print(f"{rung}: ours {r['ours_seq_s']:.0f} seq/s, reference {r['ref_seq_s']:.0f} seq/s, "
          f"ratio {r['ratio']:.1f}x", flush=True)
    peaks["jax"] = max(peaks["jax"], jax_matmul_peak(n_peak))
    peaks["torch"] = max(peaks["torch"], torch_matmul_peak(n_peak, str(device)))
  block = render(results, max(peaks.values()), peaks, args, machine, n_peak)
  print(block)
  if not args.no_write_docs:
    write_section(DOC_PATH, SECTION, block, gpu_card)
  return 0


if __name__ == "__main__":
  sys.exit(main())
