"""Decode throughput: our jitted beam search vs Hugging Face `generate`, same weights, same run.

  .venv/bin/python benchmarks/decode_throughput.py [--quick] [--device cpu|gpu] [--write_docs]

1. Matmul peak (fp32, jax and torch) measured at the start of the run; the trie rows' "% of jax peak" is against
   the same jax matmul timed in each row's own rounds (this machine drifts between speed states).
2. Docid (trie) decoding: T5 "tiny" (d_model 128, 2+2 layers, vocab 512) and "base45m" (d_model 512,
   6+6 layers, vocab 8,192), random init, exported to `T5ForConditionalGeneration` with
   `genret_jax.models.hf_convert.params_to_hf`. Trie over 5,000 random six-token docids, batch 32,
   8 new tokens, beams 1/5/20/50: ours (TrieConstraint / unconstrained) vs HF
   `generate(num_beams=k, prefix_allowed_tokens_fn=<dict trie>)` / unconstrained, timed interleaved.
   Top-k outputs are compared query by query (length penalty off on both sides).
   `--sizes llama42m`: the same for a LLaMA-like prefix-LM (d_model 512, 10 layers, vocab 8,192, 40.5M params)
   against `LlamaForCausalLM`, prompt [0] + the 32 input tokens; its tables go to their own section,
   "## Decoding: decoder-only (LLaMA)", so a run of either family leaves the other's tables alone.
3. n-gram decoding: tiny T5 with vocab 8,192 over SciFact (SentencePiece 8,192 trained on the corpus,
   cached), batch 32 SciFact queries, 10 new tokens, beams 1/5/20: ours SubstringConstraint (with
   `keep_history`, as retrieval runs it) vs ours unconstrained vs HF unconstrained; with the random
   model and with its logits biased toward frequent corpus tokens (a stand-in for a trained model,
   which puts its mass on corpus tokens; ours only).

Model FLOPs come from `genret_jax.models.accounting` (`decode_init_flops` per query + `decode_step_flops`
per beam and step actually run). With --write_docs the tables replace the "## Decoding" section of
docs/benchmarks.md (the LLaMA sizes' tables: "## Decoding: decoder-only (LLaMA)"; other sections are kept).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import inspect
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("GENRET_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = pathlib.Path(os.environ.get("GENRET_BENCH_CACHE", pathlib.Path.home() / ".cache" / "genret_jax"))
EOS, PAD = 1, 0
INPUT_LEN = 32


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="short run: fewer beams/repeats, tiny sizes only")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--beams", type=int, nargs="*", default=None, help="trie beams (default 1 5 20 50)")
  p.add_argument("--ngram_beams", type=int, nargs="*", default=None, help="n-gram beams (default 1 5 20)")
  p.add_argument("--sizes", nargs="*", default=None, help="trie model sizes: tiny base45m llama42m")
  p.add_argument("--parts", nargs="*", default=("peak", "trie", "ngram"))
  p.add_argument("--repeats", type=int, default=None, help="timed blocks per method (default 3; 1 with --quick)")
  p.add_argument("--block_seconds", type=float, default=0.5,
                 help="each timed block repeats one method's call back to back for about this long (1-10 "
                      "calls) and reports its median call; 0 = one call per block")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--spm_model", default=None, help="SentencePiece model for SciFact (default: train, cached)")
  p.add_argument("--ngram_biased_variants", nargs="*", default=(), metavar="KEY=VALUE[,KEY=VALUE]",
                 help="n-gram part: also time the biased model's n-gram search with these SubstringConstraint."
                      "from_index settings, one variant per argument (e.g. enum_iters=0 enum_chunk=128), in the "
                      "same rounds; each must return the default settings' n-grams (checked)")
  p.add_argument("--profile_dir", default=None,
                 help="after the largest beam's row of each part, trace one more call of each of our methods "
                      "with jax.profiler into DIR/<part>_beam<k>/<method> (to read a GPU run's kernels back "
                      "on another machine)")
  p.add_argument("--json_out", default=None)
  p.add_argument("--write_docs", action="store_true")
  p.add_argument("--from_json", nargs="*", default=None,
                 help="no measuring: merge the --json_out files of earlier runs (e.g. one per --parts, run "
                      "separately on a lent GPU) and print / --write_docs their tables")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
  os.environ["JAX_PLATFORMS"] = "cpu"
from _common import configure_host_malloc  # pylint: disable=g-import-not-at-top,wrong-import-position
HOST_MALLOC = configure_host_malloc() if ARGS is not None else ""   # before jax / torch start threads

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from _common import (LLAMA_BENCH_SIZES, MAX_BLOCK_CALLS, WARMUP_ROUNDS, bench_config, cpu_model, demote_headings,  # pylint: disable=g-import-not-at-top,wrong-import-position
                     interleaved, jax_matmul, jax_matmul_peak, python_command, round_ratio, torch_matmul_peak,
                     write_section)
from genret_jax.decoding import (SubstringConstraint, SuffixArrayIndex, TrieConstraint,  # pylint: disable=g-import-not-at-top,wrong-import-position
                                 beam_search, hypotheses)
from genret_jax.models import accounting  # pylint: disable=g-import-not-at-top,wrong-import-position
from genret_jax.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top,wrong-import-position
from genret_jax.models.model_api import EncoderDecoderModel, model_for_config  # pylint: disable=g-import-not-at-top,wrong-import-position


# --- environment ------------------------------------------------------------------------------------

def torch_device(requested: str):
  import torch
  if requested == "gpu":
    if torch.cuda.is_available():
      return torch.device("cuda"), torch.cuda.get_device_name(0)
    return torch.device("cpu"), "cpu (torch has no CUDA: HF ran on the CPU)"
  return torch.device("cpu"), "cpu"


def sync(dev):
  import torch
  if dev.type == "cuda":
    torch.cuda.synchronize()


def environment(tdev_name: str) -> dict:
  import torch
  import transformers
  return {"jax": jax.__version__, "jax_backend": jax.default_backend(),
          "jax_device": str(jax.devices()[0].device_kind), "torch": torch.__version__,
          "transformers": transformers.__version__, "torch_device": tdev_name, "cpu": cpu_model(),
          "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
          "host_malloc": HOST_MALLOC}


def loadavg() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


# --- matmul peak ------------------------------------------------------------------------------------

def matmul_peak(dev, n: int) -> dict:
  return {"n": n, "jax_gflops": jax_matmul_peak(n) / 1e9, "torch_gflops": torch_matmul_peak(n, str(dev)) / 1e9}


# --- models -------------------------------------------------------------------------------------------

def is_llama(size: str) -> bool:
  return size in LLAMA_BENCH_SIZES


def bench_model(size: str):
  """(config, model, the batch shapes its params are initialised from) of a benchmark size."""
  cfg = bench_config(size)
  if is_llama(size):
    return cfg, model_for_config(cfg), {"decoder_input_tokens": (1, INPUT_LEN + 9)}
  return cfg, EncoderDecoderModel(cfg), {"encoder_input_tokens": (1, INPUT_LEN), "decoder_input_tokens": (1, 8)}


def random_docids(vocab_size: int, rng: np.random.Generator, num: int = 5000, length: int = 6) -> list[tuple]:
  """`num` distinct random docids of `length` tokens in [2, vocab) (0 and 1 are pad and EOS), sorted."""
  ids = set()
  while len(ids) < num:
    ids.add(tuple(int(x) for x in rng.integers(2, vocab_size, length)))
  return sorted(ids)


def scifact_index(sp, docs_text) -> SuffixArrayIndex:
  """SciFact's documents tokenised by `sp` (ids shifted by the 2 reserved ones), as one suffix-array index."""
  return SuffixArrayIndex.build([np.asarray(x, np.int64) + 2 for x in sp.encode(docs_text)], sep_id=PAD)


def build_models(size: str, dev, seed: int = 0):
  """(our config, model, params, HF model with the same weights)."""
  import torch
  import transformers
  from genret_jax.models import hf_convert
  cfg, model, shapes = bench_model(size)
  params = model.init(jax.random.PRNGKey(seed), shapes)
  if is_llama(size):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_convert.hf_config_from(cfg)))
    sd = hf_convert.params_to_hf(params, cfg)
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                             strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
      raise RuntimeError(f"HF weight mapping: missing {missing}, unexpected {unexpected}")
    return cfg, model, params, hf.to(dev).eval()
  # Tied embeddings (T5 v1.0 output: rescaled by d_model^-0.5): transformers 5 ties T5's lm_head to
  # `shared` whatever the config says (tests/test_hf_parity.py), so an untied model cannot be exported.
  sd = hf_convert.params_to_hf(params, cfg)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_convert.hf_config_from(cfg)))
  # The stacks' embed_tokens share `shared` in the checkpoint format; load_state_dict does not re-tie
  # them, so they are set explicitly.
  for stack in ("encoder", "decoder"):
    sd.setdefault(f"{stack}.embed_tokens.weight", sd["shared.weight"])
  missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  if missing or unexpected:
    raise RuntimeError(f"HF weight mapping: missing {missing}, unexpected {unexpected}")
  hf = hf.to(dev).eval()
  return cfg, model, params, hf


def make_search(model, max_decode_len: int, bias=None):
  @functools.partial(jax.jit, static_argnames=("num_beams", "keep_history"))
  def search(params, inputs, constraint, *, num_beams, keep_history=False):
    cache, first = model.decode_init(params, inputs, max_decode_len)

    def t2l(c, t, s):
      logits, c = model.tokens_to_logits(params, c, t, s)
      return (logits if bias is None else logits + bias), c

    return beam_search(t2l, cache, first, num_beams=num_beams, max_decode_len=max_decode_len, eos_id=EOS,
                       pad_id=PAD, constraint=constraint, keep_history=keep_history)
  return search


def model_flops(cfg, batch: int, beams: int, steps: int) -> float:
  total = batch * accounting.decode_init_flops(cfg, INPUT_LEN).total
  for s in range(1, steps + 1):
    # T5: s self-attention keys + the encoded inputs; LLaMA: the INPUT_LEN prefilled prompt columns + s.
    step = (accounting.decode_step_flops(cfg, INPUT_LEN + s) if isinstance(cfg, LlamaConfig)
            else accounting.decode_step_flops(cfg, s, INPUT_LEN))
    total += batch * beams * step.total
  return total


# --- HF side ------------------------------------------------------------------------------------------

def dict_trie(ids) -> dict:
  root: dict = {}
  for s in ids:
    node = root
    for t in list(s) + [EOS]:
      node = node.setdefault(int(t), {})
  return root


def hf_prefix_fn(trie: dict, prompt_len: int = 1):
  def allowed(batch_id, input_ids):
    del batch_id
    node = trie
    for t in input_ids.tolist()[prompt_len:]:   # skip the decoder start token (T5) or the prompt (LLaMA)
      node = node.get(t)
      if node is None:
        return [PAD]
    return list(node.keys()) or [PAD]
  return allowed


def hf_generate(hf, inputs_t, mask_t, beams, max_new, prefix_fn, dev):
  import torch
  start = {"decoder_start_token_id": 0} if hf.config.is_encoder_decoder else {}
  # Beam-search-only flags: given at one beam, transformers warns that they are not valid for greedy search.
  beam_flags = {"length_penalty": 0.0, "early_stopping": False} if beams > 1 else {}
  with torch.inference_mode():
    out = hf.generate(input_ids=inputs_t, attention_mask=mask_t, num_beams=beams, num_return_sequences=beams,
                      max_new_tokens=max_new, do_sample=False, prefix_allowed_tokens_fn=prefix_fn,
                      output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS,
                      **beam_flags, **start)
  sync(dev)
  return out


def hf_encode(hf, inputs_t, mask_t, dev):
  """HF's encoder alone (its cross-attention K/V are computed in the first decode step); for a decoder-only
  model its base model over the prompt (the prefill, without logits)."""
  import torch
  encoder = hf.get_encoder() if hf.config.is_encoder_decoder else hf.model
  with torch.inference_mode():
    out = encoder(input_ids=inputs_t, attention_mask=mask_t).last_hidden_state
  sync(dev)
  return out


def hf_hypotheses(out, batch, beams, prompt_len: int = 1):
  seqs = out.sequences.cpu().numpy()
  scores = (out.sequences_scores.cpu().numpy() if getattr(out, "sequences_scores", None) is not None
            else np.zeros(len(seqs)))
  res = []
  for q in range(batch):
    hyps = []
    for j in range(beams):
      s = seqs[q * beams + j, prompt_len:].tolist()
      if EOS in s:
        s = s[:s.index(EOS)]
      hyps.append((tuple(s), float(scores[q * beams + j])))
    res.append(hyps)
  return res


def agreement(ours, theirs, tol=1e-3):
  """(fraction of queries whose top-k lists are identical, fraction identical up to near-tie order
  swaps (|score difference| < tol), number of the remaining queries where ours is the better top-k,
  number differing otherwise).

  "Ours better": the lists differ only in hypotheses that score higher in ours than every hypothesis
  found only by HF. That is what HF's beam scorer does by design: of the 2K candidates per step it keeps
  an EOS-ended one only if it ranks among the first K, and at the length limit it finishes only the K
  live beams, where ours pools every finished candidate of the 2K (so its top-k is exact)."""
  same = tie = better = 0
  for a, b in zip(ours, theirs):
    ta, tb = [h for h, _ in a], [h for h, _ in b]
    if ta == tb:
      same += 1
      tie += 1
      continue
    sa = np.array([s for _, s in a])
    sb = np.array([s for _, s in b])
    if len(ta) == len(tb) and set(ta) == set(tb) and np.allclose(np.sort(sa), np.sort(sb), atol=tol):
      tie += 1
    elif len(ta) == len(tb) and np.allclose(sa, sb, atol=tol):
      tie += 1     # same scores in the same order: the hypotheses differ only at a near tie at the cut
    else:
      da, db = dict(a), dict(b)
      only_a = [sc for h, sc in a if h not in db]
      only_b = [sc for h, sc in b if h not in da]
      if len(ta) >= len(tb) and only_a and (not only_b or min(only_a) >= max(only_b) - tol):
        better += 1
  n = max(len(ours), 1)
  return same / n, tie / n, better, n - tie - better


def hf_num_steps(out, prompt_len: int = 1) -> int:
  return int(out.sequences.shape[1] - prompt_len)


# --- benchmarks --------------------------------------------------------------------------------------

PROFILE_DIR = None   # set by main from --profile_dir


def profile_calls(methods: dict, where: str) -> None:
  """One traced call of each of our methods (names starting with "ours" or "biased[") into PROFILE_DIR/where/<name>,
  after the timed rounds so the traces cost the timings nothing. A profiler failure (e.g. no CUPTI on a GPU image)
  is reported once and turns profiling off; it never stops the benchmark."""
  global PROFILE_DIR
  if not PROFILE_DIR:
    return
  for name, fn in methods.items():
    if not name.startswith(("ours", "biased[")):
      continue
    path = os.path.join(PROFILE_DIR, where, re.sub(r"[^\w.-]+", "_", name).strip("_"))
    try:
      with jax.profiler.trace(path):
        fn()
    except Exception as e:  # pylint: disable=broad-except
      print(f"warning: profiling stopped ({type(e).__name__}: {e})", file=sys.stderr)
      PROFILE_DIR = None
      return


def bench_trie(size, beams_list, repeats, block_seconds, batch, dev, log, peak_n: int = 2048) -> None:
  """Hands each beam's row to `log`. A `peak_n`^2 jax matmul is timed in every row's rounds, so the row's "% of
  peak" compares rates of the same moments (the machine's speed state moves during a run)."""
  import torch
  cfg, model, params, hf = build_models(size, dev)
  rng = np.random.default_rng(0)
  v = cfg.vocab_size
  ids = random_docids(v, rng)
  trie = TrieConstraint.build(ids, vocab_size=v, eos_id=EOS)
  inputs = rng.integers(2, v, (batch, INPUT_LEN)).astype(np.int32)
  inputs[:, -1] = EOS
  inputs_j = jnp.asarray(inputs)
  # HF's decoder-only prompt is ours: the start token 0, then the inputs (`DecoderOnlyModel.decode_init`).
  hf_inputs = np.concatenate([np.zeros((batch, 1), np.int32), inputs], 1) if is_llama(size) else inputs
  prompt_len = hf_inputs.shape[1] if is_llama(size) else 1
  prefix_fn = hf_prefix_fn(dict_trie(ids), prompt_len)
  inputs_t = torch.from_numpy(hf_inputs.astype(np.int64)).to(dev)
  mask_t = torch.ones_like(inputs_t)
  max_new = 8
  search = make_search(model, max_new)
  init = jax.jit(lambda p, x: model.decode_init(p, x, max_new))
  matmul, mm_a = jax_matmul(peak_n)
  for k in beams_list:
    def ours(constraint):
      def fn():
        out = jax.block_until_ready(search(params, inputs_j, constraint, num_beams=k))
        return hypotheses(out), int(out.num_steps)
      return fn

    def theirs(pfn):
      def fn():
        out = hf_generate(hf, inputs_t, mask_t, k, max_new, pfn, dev)
        return hf_hypotheses(out, batch, k, prompt_len), hf_num_steps(out, prompt_len)
      return fn

    # The free search first: on a GPU the first program of a shape pays the model's GEMM autotuning (session 12:
    # the H100 trie search's 30 s first call, docs/decoding.md), so the trie's first call is its own compile.
    methods = {"ours_free": ours(None), "hf_free": theirs(None), "ours_trie": ours(trie),
               "hf_trie": theirs(prefix_fn)}
    methods["jax_matmul"] = lambda: (jax.block_until_ready(matmul(mm_a)), 0)
    if k == 1:
      # At one beam the encoder is most of a call and both frameworks run it GEMM-bound, so HF's call over our
      # decode_init bounds ours/HF there; timed in the same rounds (session 12).
      methods["ours_init"] = lambda: (jax.block_until_ready(init(params, inputs_j)), 0)
      methods["hf_encoder"] = lambda: (hf_encode(hf, inputs_t, mask_t, dev), 0)
    r = interleaved(methods, repeats, block_seconds)
    if k == max(beams_list):
      profile_calls(methods, f"trie_{size}_beam{k}")
    row = {"size": size, "beams": k, "batch": batch, "new_tokens": max_new, "load": loadavg()}
    mm = r.pop("jax_matmul")
    mm_flops = 2.0 * peak_n ** 3
    row.update(jax_matmul_n=peak_n, jax_matmul_gflops=mm_flops / mm.seconds / 1e9)

    def peak_frac(name, flops):
      """Median over rounds of the method's FLOP rate over the matmul's in the same round."""
      return statistics.median((flops / t) / (mm_flops / m) for t, m in zip(r[name].round_seconds, mm.round_seconds))

    row["ours_trie_peak_frac"] = peak_frac("ours_trie", model_flops(cfg, batch, k, r["ours_trie"].steps))
    if k == 1:
      init_flops = batch * accounting.decode_init_flops(cfg, INPUT_LEN).total
      row["init_bound"] = round_ratio(r, "hf_trie", "ours_init")
      row["ours_init_peak_frac"] = peak_frac("ours_init", init_flops)
      row.update(ours_init_ms=1e3 * r.pop("ours_init").seconds, hf_encoder_ms=1e3 * r.pop("hf_encoder").seconds)
      row["ours_init_gflops"] = init_flops / row["ours_init_ms"] / 1e6
    for name, t in r.items():
      row[f"{name}_qps"] = batch / t.seconds
      row[f"{name}_gflops"] = model_flops(cfg, batch, k, t.steps) / t.seconds / 1e9
      row[f"{name}_steps"] = t.steps
      row[f"{name}_first_call_s"] = t.first_call_seconds
    for kind in ("trie", "free"):
      same, tie, better, bad = agreement(r[f"ours_{kind}"].result, r[f"hf_{kind}"].result)
      row[f"agree_{kind}"] = same
      row[f"agree_{kind}_ties"] = tie
      row[f"ours_better_{kind}"] = better
      row[f"disagree_{kind}"] = bad
    row["speedup_trie"] = round_ratio(r, "hf_trie", "ours_trie")
    row["ours_trie_overhead"] = round_ratio(r, "ours_trie", "ours_free") - 1
    row["hf_trie_overhead"] = round_ratio(r, "hf_trie", "hf_free") - 1
    log(row)


def scifact_texts():
  with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt") as f:
    docs = [f"{d.get('title', '')} {d.get('text', '')}".strip() for d in map(json.loads, f)]
  with open(DATA / "scifact" / "queries.jsonl") as f:
    queries = [json.loads(line)["text"] for line in f]
  return docs, queries


def scifact_spm(path, texts, log):
  """The SentencePiece model: `path` if given, else a unigram 8,192-piece model trained on SciFact
  (8,190 pieces + 2: ids shift by 2 so 0 = separator/pad and 1 = EOS stay free), cached.

  Seeded and on one thread: the trainer's sampling and its EM split differ run to run otherwise, and so would the
  n-gram rows' identifiers (the same pieces on every machine; `benchmarks/gpu_prepare.sh` builds it for a GPU run)."""
  import sentencepiece as spm
  if path:
    return spm.SentencePieceProcessor(model_file=str(path)), f"given: {path}"
  CACHE.mkdir(parents=True, exist_ok=True)
  prefix = CACHE / "scifact_unigram_8190_seed0"
  if not (prefix.with_suffix(".model")).exists():
    t = time.perf_counter()
    txt = CACHE / "scifact_corpus.txt"
    txt.write_text("\n".join(texts))
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(input=str(txt), model_prefix=str(prefix), vocab_size=8190,
                                   model_type="unigram", input_sentence_size=200000,
                                   shuffle_input_sentence=True, num_threads=1,
                                   minloglevel=2, seed_sentencepiece_size=200000)
    log({"spm_trained_seconds": time.perf_counter() - t})
  return (spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model"))),
          "unigram, 8,190 pieces trained on the SciFact corpus (+2 reserved ids)")


def parse_settings(spec: str) -> dict:
  """'enum_iters=0,enum_chunk=128' -> {'enum_iters': 0, 'enum_chunk': 128} (ints; true/false as bools)."""
  known = set(inspect.signature(SubstringConstraint.from_index).parameters) - {"index", "vocab_size", "eos_id"}
  out = {}
  for item in filter(None, spec.split(",")):
    key, sep, val = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--ngram_biased_variants: {item!r} is not KEY=VALUE")
    if key.strip() not in known:
      raise SystemExit(f"--ngram_biased_variants: {key.strip()!r} is not a SubstringConstraint.from_index "
                       f"setting ({', '.join(sorted(known))})")
    low = val.strip().lower()
    try:
      out[key.strip()] = {"true": True, "false": False}[low] if low in ("true", "false") else int(val)
    except ValueError:
      raise SystemExit(f"--ngram_biased_variants: {item!r}: value is not an int or true/false") from None
  return out


def bench_ngram(beams_list, repeats, block_seconds, batch, dev, spm_path, log, variants=()) -> None:
  """Hands the corpus description ({"ngram_meta": ...}) and then each beam's row to `log`. `variants`: specs of
  other constraint settings (`parse_settings`) timed on the biased model in the same rounds."""
  import torch
  docs_text, queries = scifact_texts()
  sp, sp_desc = scifact_spm(spm_path, docs_text, log)
  index = scifact_index(sp, docs_text)
  cfg, model, params, hf = build_models("tiny_v8k", dev)
  v = cfg.vocab_size
  sc = SubstringConstraint.from_index(index, vocab_size=v, eos_id=EOS)
  # The other loop shapes (static unrolled searches on CPU, traced while loops on accelerators), timed
  # in the same run: the evidence for the per-platform default.
  sc_alt = SubstringConstraint.from_index(index, vocab_size=v, eos_id=EOS,
                                          static_searches=not sc.static_searches)
  sc_variants = {spec: SubstringConstraint.from_index(index, vocab_size=v, eos_id=EOS, **parse_settings(spec))
                 for spec in variants}
  shapes = "static" if sc.static_searches else "traced"
  alt_shapes = "traced" if sc.static_searches else "static"
  meta = {"corpus_tokens": index.num_tokens, "docs": index.num_docs, "tokenizer": sp_desc,
          "constraint_bytes": sc.nbytes, "pair_table": sc.has_pairs, "shapes": shapes,
          "alt_shapes": alt_shapes, "search_rounds": sc.search_rounds}
  log({"ngram_meta": meta})
  inputs = np.zeros((batch, INPUT_LEN), np.int32)
  for i, q in enumerate(sp.encode(queries[:batch])):
    q = (np.asarray(q) + 2)[:INPUT_LEN - 1]
    inputs[i, :len(q)] = q
    inputs[i, len(q)] = EOS
  inputs_j = jnp.asarray(inputs)
  inputs_t = torch.from_numpy(inputs.astype(np.int64)).to(dev)
  mask_t = (inputs_t > 0).long()
  max_new = 10
  counts = np.bincount(index.tokens.astype(np.int64), minlength=v)[:v].astype(np.float64)
  counts[[PAD, EOS]] = 0
  # A trained retrieval model puts most of its mass on corpus tokens; this bias does that crudely.
  bias = jnp.asarray(4.0 * np.log1p(counts) / max(np.log1p(counts).max(), 1.0), jnp.float32)
  search = make_search(model, max_new)
  search_b = make_search(model, max_new, bias)
  for k in beams_list:
    def ours(s, constraint, hist):
      def fn():
        out = jax.block_until_ready(s(params, inputs_j, constraint, num_beams=k, keep_history=hist))
        return hypotheses(out), int(out.num_steps)
      return fn

    def hf_free():
      out = hf_generate(hf, inputs_t, mask_t, k, max_new, None, dev)
      return hf_hypotheses(out, batch, k), hf_num_steps(out)

    methods = {"ours_ngram": ours(search, sc, True), "ours_ngram_alt": ours(search, sc_alt, True),
               "ours_free": ours(search, None, False),
               "hf_free": hf_free, "ours_ngram_biased": ours(search_b, sc, True),
               "ours_free_biased": ours(search_b, None, False)}
    for spec, c in sc_variants.items():
      methods[f"biased[{spec}]"] = ours(search_b, c, True)
    r = interleaved(methods, repeats, block_seconds)
    if k == max(beams_list):
      profile_calls(methods, f"ngram_beam{k}")
    row = {"beams": k, "batch": batch, "new_tokens": max_new, "load": loadavg()}
    if sc_variants:
      row["biased_variants"] = [
          {"settings": spec, "qps": batch / r[f"biased[{spec}]"].seconds,
           "first_call_s": r[f"biased[{spec}]"].first_call_seconds,
           "overhead": round_ratio(r, f"biased[{spec}]", "ours_free_biased") - 1} for spec in sc_variants]
    for spec in sc_variants:
      if r.pop(f"biased[{spec}]").result != r["ours_ngram_biased"].result:
        raise AssertionError(f"beam {k}: settings {spec} returned other n-grams than the defaults (biased model)")
    for name, t in r.items():
      row[f"{name}_qps"] = batch / t.seconds
      row[f"{name}_steps"] = t.steps
      row[f"{name}_first_call_s"] = t.first_call_seconds
    if r["ours_ngram"].result != r["ours_ngram_alt"].result:
      raise AssertionError(f"beam {k}: {shapes} and {alt_shapes} loop shapes returned different n-grams")
    same, tie, better, bad = agreement(r["ours_free"].result, r["hf_free"].result)
    row.update(agree_free=same, agree_free_ties=tie, ours_better_free=better, disagree_free=bad)
    row["ngram_vs_hf_free"] = round_ratio(r, "hf_free", "ours_ngram")
    row["ngram_overhead"] = round_ratio(r, "ours_ngram", "ours_free") - 1
    row["ngram_alt_overhead"] = round_ratio(r, "ours_ngram_alt", "ours_free") - 1
    row["ngram_overhead_biased"] = round_ratio(r, "ours_ngram_biased", "ours_free_biased") - 1
    log(row)


# --- report ------------------------------------------------------------------------------------------

def _better(row: dict, kind: str) -> str:
  """The agreement cell's note on queries where ours is the better top-k (see `agreement`), if any."""
  n, bad = row.get(f"ours_better_{kind}"), row.get(f"disagree_{kind}", 0)
  if n is None:   # results from before this count existed
    return ""
  out = f" (+{n} ours better)" if n else ""
  return out + (f" ({bad} other)" if bad else "")


SECTION, LLAMA_SECTION = "## Decoding", "## Decoding: decoder-only (LLaMA)"


def sections(res: dict) -> list[str]:
  """The docs sections a result has tables for: T5 trie sizes and the n-gram part go to SECTION, the LLaMA
  sizes to LLAMA_SECTION."""
  sizes = list(res.get("trie", {}))
  out = [SECTION] if "ngram" in res or any(not is_llama(x) for x in sizes) else []
  return out + ([LLAMA_SECTION] if any(is_llama(x) for x in sizes) else [])


def markdown(res: dict, command: str, section: str = SECTION) -> str:
  env = res["env"]
  llama = section == LLAMA_SECTION
  out = [section, "",
         f"Command: `{command}`  ", f"Machine: {env['cpu']}, {env['cores']} cores; jax {env['jax']} "
         f"({env['jax_backend']}: {env['jax_device']}), torch {env['torch']} ({env['torch_device']}, "
         f"{env['torch_threads']} threads), transformers {env['transformers']}"
         + (f"; {env['host_malloc']}" if env.get("host_malloc") else "") + ".  ",
         f"Load average at start / end: {res['load_start']} / {res['load_end']} (shared machine: methods "
         f"are timed round-robin in the same run, so compare ratios within a row). Timing: median over "
         f"{res.get('repeats', '?')} blocks per method; a block repeats one method's call back to back for "
         f"~{res.get('block_seconds', '?')} s (1-{MAX_BLOCK_CALLS} calls) and counts its median call"
         + (f", after {res['warmup_rounds']} discarded round(s) of blocks." if res.get("warmup_rounds")
            else "; no discarded warm-up round.")
         + (" Ratios and overheads are medians of per-round ratios (the blocks of one round run back to back), so "
            "they can differ from the ratios of the q/s columns." if res.get("round_ratios")
            else " Ratios and overheads are ratios of the q/s columns."), "",
         "Top-k agreement: fraction of queries with identical lists / identical up to near-tie order; "
         "'+N ours better': queries whose lists differ only by hypotheses that score higher in ours (HF's beam "
         "scorer keeps an EOS-ended candidate only if it ranks in the first K of its 2K per step and finishes only "
         "the K live beams at the length limit; ours pools every finished candidate, so its top-k is exact).", ""]
  if "peak" in res:
    p = res["peak"]
    out += [f"fp32 matmul peak ({p['n']}x{p['n']}): jax {p['jax_gflops']:.0f} GFLOP/s, torch "
            f"{p['torch_gflops']:.0f} GFLOP/s.", ""]
  peak = res.get("peak", {}).get("jax_gflops")
  for size, block in res.get("trie", {}).items():
    if is_llama(size) != llama:
      continue
    model = (f"LLaMA prefix-LM `{size}` ({block['params'] / 1e6:.1f}M params), prompt {INPUT_LEN + 1} tokens" if llama
             else f"T5 `{size}` ({block['params'] / 1e6:.1f}M params)")
    out += [f"### Trie (docids): {model}, 5,000 six-token docids, batch 32, 8 new tokens", "",
            "| beams | ours q/s | HF q/s | ours/HF | ours GFLOP/s | HF GFLOP/s | ours % of jax peak | "
            "ours free q/s | HF free q/s | trie overhead ours / HF | top-k agree (exact / up to ties) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in block["rows"]:
      frac = r.get("ours_trie_peak_frac", r["ours_trie_gflops"] / peak if peak else None)
      pk = f"{100 * frac:.0f}%" if frac is not None else "n/a"
      out.append(f"| {r['beams']} | {r['ours_trie_qps']:.1f} | {r['hf_trie_qps']:.1f} | "
                 f"{r['speedup_trie']:.2f}x | {r['ours_trie_gflops']:.1f} | {r['hf_trie_gflops']:.1f} | {pk} | "
                 f"{r['ours_free_qps']:.1f} | {r['hf_free_qps']:.1f} | {100 * r['ours_trie_overhead']:+.0f}% / "
                 f"{100 * r['hf_trie_overhead']:+.0f}% | trie {r['agree_trie']:.2f} / {r['agree_trie_ties']:.2f}"
                 f"{_better(r, 'trie')}, free {r['agree_free']:.2f} / {r['agree_free_ties']:.2f}"
                 f"{_better(r, 'free')} |")
    out += ["", *_first_calls(block["rows"], ("ours_trie", "ours_free", "hf_trie", "hf_free"))]
    same = [r["jax_matmul_gflops"] for r in block["rows"] if "ours_trie_peak_frac" in r]
    if same:
      out += [f"\"% of jax peak\": per round, ours' FLOP rate over that of a {block['rows'][-1]['jax_matmul_n']}^2 jax "
              f"matmul timed in the same rounds (median over rounds; the matmul read {min(same):.0f}-{max(same):.0f} "
              "GFLOP/s across these rows; the peak line above is one reading at the start of the run).", ""]
    for r in block["rows"]:
      if "init_bound" in r:
        frac = r.get("ours_init_peak_frac", r["ours_init_gflops"] / peak if peak else None)
        pk = f", {100 * frac:.0f}% of the jax peak" if frac is not None else ""
        what, theirs = (("prompt prefill", "HF's base model over the prompt") if llama
                        else ("encoder + cross-attention K/V", "HF's encoder"))
        out += [f"Beam {r['beams']}, {'prefill' if llama else 'encoder'} alone (same rounds): ours `decode_init` "
                f"({what}) {r['ours_init_ms']:.1f} ms at {r['ours_init_gflops']:.0f} GFLOP/s{pk}; {theirs} "
                f"{r['hf_encoder_ms']:.1f} ms. HF's trie call / our decode_init: {r['init_bound']:.2f}x, the most "
                "ours/HF could read at this beam with free decode steps.", ""]
  if "ngram" in res and not llama:
    m = res["ngram"]["meta"]
    out += ["### n-gram (SciFact suffix array): tiny T5, vocab 8,192, batch 32, 10 new tokens", "",
            f"Corpus: {m['docs']:,} documents, {m['corpus_tokens']:,} indexed tokens; tokenizer: "
            f"{m['tokenizer']}; device constraint arrays {m['constraint_bytes'] / 2**20:.1f} MiB "
            f"(bigram table: {m['pair_table']}). Ours n-gram runs with `keep_history=True`"
            + (f", with this platform's default loop shapes ({m['shapes']} searches"
               + (f", {m['search_rounds']} rounds" if m['shapes'] == "static" else "")
               + f"); the other shapes ({m['alt_shapes']}) are timed in the same run and return the same "
               "n-grams (checked)" if "shapes" in m else "") + ".", "",
            "| beams | ours n-gram q/s | ours free q/s | HF free q/s | n-gram / HF free | n-gram overhead | "
            "other loop shapes: n-gram q/s (overhead) | "
            "biased model: n-gram q/s | free q/s | overhead | ours vs HF free agree (exact / ties) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["ngram"]["rows"]:
      alt = (f"{r['ours_ngram_alt_qps']:.1f} ({100 * r['ngram_alt_overhead']:+.0f}%)"
             if "ours_ngram_alt_qps" in r else "n/a")
      out.append(f"| {r['beams']} | {r['ours_ngram_qps']:.1f} | {r['ours_free_qps']:.1f} | "
                 f"{r['hf_free_qps']:.1f} | {r['ngram_vs_hf_free']:.2f}x | {100 * r['ngram_overhead']:+.0f}% | "
                 f"{alt} | "
                 f"{r['ours_ngram_biased_qps']:.1f} | {r['ours_free_biased_qps']:.1f} | "
                 f"{100 * r['ngram_overhead_biased']:+.0f}% | {r['agree_free']:.2f} / {r['agree_free_ties']:.2f}"
                 f"{_better(r, 'free')} |")
    out += ["", *_first_calls(res["ngram"]["rows"], ("ours_ngram", "ours_ngram_alt", "ours_free", "hf_free"))]
    var_rows = [r for r in res["ngram"]["rows"] if r.get("biased_variants")]
    if var_rows:
      per_beam = "; ".join(f"beam {r['beams']}: " + ", ".join(
          f"`{x['settings']}` {x['qps']:.1f} q/s ({100 * x['overhead']:+.0f}%)" for x in r["biased_variants"])
          for r in var_rows)
      out += [f"Biased model, other constraint settings (same rounds, same n-grams as the defaults; overhead vs "
              f"the biased free search): {per_beam}.", ""]
  out += res.get("notes", [])
  return "\n".join(out).rstrip() + "\n"


def _first_calls(rows, methods) -> list[str]:
  """One line with each method's first call (compile + one call) per beam, when the rows recorded it (since
  session 11): on a GPU compiling can take most of a run (session 11's first H100 search program: 30 s at beam 20,
  most of it likely the model's GEMM autotuning)."""
  if not rows or f"{methods[0]}_first_call_s" not in rows[0]:
    return []
  per_beam = "; ".join(f"beam {r['beams']}: " + " / ".join(f"{r[m + '_first_call_s']:.1f}" for m in methods)
                       for r in rows)
  return [f"First call (compile + one call), seconds, {' / '.join(methods)}: {per_beam}.", ""]


def write_docs(res: dict, command: str, gpu_card: str | None) -> None:
  """The result's sections of docs/benchmarks.md (`sections`); a GPU run writes its own "### GPU: <card>"
  subsection of each."""
  for section in sections(res):
    body = markdown(res, command, section).split("\n", 1)[1]   # drop the section's heading line
    if gpu_card:
      body = demote_headings(body)
    write_section(str(ROOT / "docs" / "benchmarks.md"), section, body, gpu_card)


def merge_results(paths) -> tuple[dict, str]:
  """One result dict from several --json_out files of the same machine (later files win per key; trie rows
  merge per size and beam)."""
  res, commands = {"notes": []}, []
  for path in paths:
    part = json.loads(pathlib.Path(path).read_text())
    commands.append(part.pop("command", f"(command not recorded in {path})"))
    res.setdefault("env", part["env"])
    res.setdefault("load_start", part.get("load_start", "n/a"))
    res["load_end"] = part.get("load_end", "n/a")
    res["notes"] += part.get("notes", [])
    if part.get("partial"):
      res["notes"].append(f"Partial: `{commands[-1]}` stopped before its last row; its table has the rows it "
                          "finished.")
    for key in ("peak", "ngram", "repeats", "block_seconds", "warmup_rounds", "round_ratios"):
      if key in part:
        res[key] = part[key]
    for size, block in part.get("trie", {}).items():   # rows of one size can come from several runs
      merged = res.setdefault("trie", {}).setdefault(size, {**block, "rows": []})
      rows = {r["beams"]: r for r in merged["rows"] + block["rows"]}   # a later run's row of a beam wins
      merged["rows"] = [rows[b] for b in sorted(rows)]
  return res, "` + `".join(commands)


def main(args) -> int:
  global PROFILE_DIR
  if args.from_json:
    res, command = merge_results(args.from_json)
    print("\n".join(markdown(res, command, section) for section in sections(res)))
    if args.write_docs:
      env = res["env"]
      write_docs(res, command, f"{env['jax_device']} (jax) / {env['torch_device']} (torch)"
                 if env["jax_backend"] != "cpu" else None)
    return 0
  quick = args.quick
  repeats = args.repeats or (1 if quick else 3)
  beams = args.beams or ([1, 20] if quick else [1, 5, 20, 50])
  ngram_beams = args.ngram_beams or ([1, 20] if quick else [1, 5, 20])
  sizes = args.sizes or (["tiny"] if quick else ["tiny", "base45m"])
  dev, tname = torch_device(args.device)
  if args.device == "gpu" and jax.default_backend() == "cpu":
    print("warning: --device gpu but jax found no accelerator; jax runs on the CPU", file=sys.stderr)
  res = {"env": environment(tname), "load_start": loadavg(), "notes": [], "repeats": repeats,
         "block_seconds": args.block_seconds, "warmup_rounds": WARMUP_ROUNDS, "round_ratios": True}
  if "no CUDA" in tname:
    res["notes"].append("Note: torch has no CUDA in this environment, so HF ran on the CPU.")

  command = (f"{python_command()} benchmarks/decode_throughput.py " + " ".join(sys.argv[1:])).strip()

  def checkpoint():
    """--json_out after every row, marked partial: a GPU step's time limit (compiles take tens of seconds there)
    can end the run, and the rows it finished still merge with --from_json (session 11 lost a trie row so)."""
    if args.json_out:
      pathlib.Path(args.json_out).write_text(json.dumps(
          {**res, "load_end": loadavg(), "command": command, "partial": True}, indent=2))

  def log(x):
    print(json.dumps(x), flush=True)
    if "ngram_meta" in x:
      res["ngram"] = {"rows": [], "meta": x["ngram_meta"]}
    elif "ngram_vs_hf_free" in x:
      res["ngram"]["rows"].append(x)
      checkpoint()
    elif "speedup_trie" in x:
      res["trie"][x["size"]]["rows"].append(x)
      checkpoint()

  log(res["env"])
  if "peak" in args.parts:
    res["peak"] = matmul_peak(dev, 1024 if quick else 2048)
    log(res["peak"])
  # The benchmarks hand every row (and the n-gram corpus description) to `log`, which files it into `res`.
  for spec in args.ngram_biased_variants:   # fail before minutes of set-up
    parse_settings(spec)
  PROFILE_DIR = args.profile_dir
  if "ngram" in args.parts:
    bench_ngram(ngram_beams, repeats, args.block_seconds, args.batch, dev, args.spm_model, log,
                args.ngram_biased_variants)
  if "trie" in args.parts:
    res["trie"] = {}
    for size in sizes:
      res["trie"][size] = {"rows": [], "params": accounting.count_params(bench_config(size)).total}
      bench_trie(size, beams, repeats, args.block_seconds, args.batch, dev, log, 1024 if quick else 2048)
  res["load_end"] = loadavg()
  res["command"] = command
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(res, indent=2))
  print("\n".join(markdown(res, command, section) for section in sections(res)))
  if args.write_docs:
    on_gpu = args.device == "gpu" and jax.default_backend() != "cpu"
    write_docs(res, command, f"{res['env']['jax_device']} (jax) / {tname} (torch)" if on_gpu else None)
  return 0


if __name__ == "__main__":
  sys.exit(main(ARGS))
