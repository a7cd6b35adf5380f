"""Index-build and decode-scaling benchmark for the substring (n-gram) constraint.

  .venv/bin/python benchmarks/index_build.py [--copies 1 4 16] [--beams 1 5 20] [--write_docs]

1. Suffix-array build speed (tokens/s) and memory (bytes per indexed token) on SciFact, tokenised two
   ways: lowercased whitespace words -> ids (int32 tokens) and the 1,000-piece SentencePiece model in
   ../shared/data/tokenizers (uint16 tokens).
2. Decode time of the n-gram-constrained beam search (fake model, vocab 1,000, batch 32, 10 new tokens)
   as the corpus grows (1x, 4x, 16x copies of SciFact) and with beam size, against the same search
   unconstrained, timed round-robin with it in the same rounds.
3. The same search over the index split into S shards by documents (`ShardedSubstringConstraint`, all
   shards on this one device), against the one-shard constraint: what the shard loop costs in compute.
With --write_docs the tables replace the "## Index build" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import pathlib
import sys
import time

from _common import configure_host_malloc, cpu_model, interleaved, python_command, round_ratio, write_section

HOST_MALLOC = configure_host_malloc() if __name__ == "__main__" else ""   # before jax starts its threads

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from genret_jax.decoding import ShardedSubstringConstraint, SubstringConstraint, SuffixArrayIndex, beam_search
from genret_jax.decoding.fake_model import FakeModel, fake_tokens_to_logits

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("GENRET_SHARED_DATA", ROOT.parent / "shared" / "data"))
EOS, SEP = 1, 0


def scifact_texts() -> list[str]:
  with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt") as f:
    return [f"{d.get('title', '')} {d.get('text', '')}".strip() for d in map(json.loads, f)]


def word_ids(texts):
  vocab: dict[str, int] = {}
  return [np.array([vocab.setdefault(w, len(vocab) + 2) for w in t.lower().split()], np.int64)
          for t in texts]


def spm_ids(texts):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(
      model_file=str(DATA / "tokenizers" / "sentencepiece_botchan" / "botchan_en_unigram_1000.model"))
  # Shift by 2 so 0 (separator) and 1 (EOS) never occur inside documents.
  return [np.asarray(x, np.int64) + 2 for x in sp.encode(texts)], sp.get_piece_size() + 2


def time_build(docs, repeats=3):
  best = None
  for _ in range(repeats):
    t = time.perf_counter()
    index = SuffixArrayIndex.build(docs, sep_id=SEP)
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
  return index, best


def time_cached_load(index, repeats=3):
  """Seconds to load a saved index memory-mapped and read all of it once (best of `repeats`; the files are in
  the page cache, as on a host that built or loaded them before)."""
  import tempfile
  best = None
  with tempfile.TemporaryDirectory() as d:
    index.save(d)
    for _ in range(repeats):
      t = time.perf_counter()
      loaded = SuffixArrayIndex.load(d)
      int(loaded.tokens.sum()) + int(loaded.sa.sum())
      dt = time.perf_counter() - t
      best = dt if best is None else min(best, dt)
  return best


@functools.partial(jax.jit, static_argnames=("num_beams", "max_decode_len"))
def _search(params, cache, first, constraint, *, num_beams, max_decode_len):
  return beam_search(functools.partial(fake_tokens_to_logits, params), cache, first, num_beams=num_beams,
                     max_decode_len=max_decode_len, eos_id=EOS, constraint=constraint)


def decode_call(model, cache, first, constraint, beams, steps):
  """One search call, as `_common.interleaved` times methods: () -> (output, 0)."""
  return lambda: (jax.block_until_ready(_search(model.params, cache, first, constraint, num_beams=beams,
                                                max_decode_len=steps)), 0)


ROUNDS = 5          # timed round-robin rounds per row (`_common.interleaved`, after a discarded one)
BLOCK_SECONDS = 0.5


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16])
  p.add_argument("--beams", type=int, nargs="+", default=[1, 5, 20])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--top_m", type=int, default=64)
  p.add_argument("--shards", type=int, nargs="*", default=[4],
                 help="shard counts timed against one shard on the first --copies corpus ('' for none)")
  p.add_argument("--write_docs", action="store_true")
  p.add_argument("--other_shapes", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the substring constraint's other loop shapes (static on CPU, traced on "
                      "accelerators); on CPU the static shapes are slow with this fake model's large intervals")
  args = p.parse_args(argv)
  texts = scifact_texts()
  lines = []
  lines.append("| tokenisation | docs | indexed tokens | token dtype | build s | tokens/s | bytes/token |")
  lines.append("|---|---|---|---|---|---|---|")
  words = word_ids(texts)
  t = time.perf_counter()
  pieces, vocab = spm_ids(texts)
  tokenise_s = time.perf_counter() - t
  for name, docs in (("whitespace words", words), ("SentencePiece 1k", pieces)):
    index, sec = time_build(docs)
    lines.append(f"| {name} | {index.num_docs:,} | {index.num_tokens:,} | {index.tokens.dtype} | "
                 f"{sec:.3f} | {index.num_tokens / sec / 1e6:.1f}M | {index.bytes_per_token:.2f} |")
    print(lines[-1], flush=True)
  load_s = time_cached_load(index)
  lines += ["", f"What a retrieval job start pays for the SentencePiece index (`retrieval/scheme_index.py` caches "
            f"it with the task): tokenising the corpus {tokenise_s:.2f} s + building {sec:.3f} s, against "
            f"{load_s:.3f} s to load the saved index (memory-mapped, then read through once; best of 3)."]
  print(lines[-1], flush=True)

  model = FakeModel(vocab, seed=0, rank=32, num_step_tables=1, scale=1.0)
  rng = np.random.default_rng(0)
  cache, first = model.decode_init(rng.integers(2, vocab, size=(args.batch, 8)))
  dec = ["", f"Decode: fake model (vocab {vocab}, rank-32 logits), batch {args.batch}, "
         f"{args.steps} new tokens, top_m {args.top_m}; queries/s, timed round-robin against the unconstrained "
         f"search in the same rounds (`_common.interleaved`: {ROUNDS} rounds of ~{BLOCK_SECONDS} s blocks per "
         "method after a discarded one; overheads are medians of per-round time ratios). Loop shapes of the "
         f"substring constraint: this platform's default ({'static' if jax.default_backend() != 'cpu' else 'traced'}"
         " searches)" + ("; the other shapes in the last column return the same n-grams (checked)."
                           if args.other_shapes else "; the other shapes were not run (--no-other_shapes)."), "",
         "| corpus | indexed tokens | beam | n-gram constrained q/s | unconstrained q/s | overhead | "
         "other loop shapes: q/s (overhead) |",
         "|---|---|---|---|---|---|---|"]
  for copies in args.copies:
    index = SuffixArrayIndex.build(pieces * copies, sep_id=SEP)
    sc = SubstringConstraint.from_index(index, vocab_size=vocab, eos_id=EOS, top_m=args.top_m)
    alt = SubstringConstraint.from_index(index, vocab_size=vocab, eos_id=EOS, top_m=args.top_m,
                                         static_searches=not sc.static_searches)
    if copies == args.copies[0]:
      one = sc   # the shard table's reference
    for beams in args.beams:
      methods = {"ngram": decode_call(model, cache, first, sc, beams, args.steps),
                 "free": decode_call(model, cache, first, None, beams, args.steps)}
      if args.other_shapes:
        methods["alt"] = decode_call(model, cache, first, alt, beams, args.steps)
      r = interleaved(methods, ROUNDS, BLOCK_SECONDS)
      out = r["ngram"].result
      assert bool(np.asarray(out.valid)[:, 0].all())
      other = "not run"
      if args.other_shapes:
        assert np.array_equal(np.asarray(out.tokens), np.asarray(r["alt"].result.tokens))
        other = f"{args.batch / r['alt'].seconds:.1f} ({round_ratio(r, 'alt', 'free') - 1:+.0%})"
      dec.append(f"| {copies}x SciFact | {index.num_tokens:,} | {beams} | {args.batch / r['ngram'].seconds:.1f} | "
                 f"{args.batch / r['free'].seconds:.1f} | {round_ratio(r, 'ngram', 'free') - 1:+.0%} | {other} |")
      print(dec[-1], flush=True)
  if args.shards:
    dec += ["", f"Sharded index ({args.copies[0]}x SciFact, every shard on this one device; same fake model and "
            "search; the sharded searches return the same n-grams, scores and counts as one shard, checked), timed "
            "as above; the last column is the median over rounds of the per-round time ratio:", "",
            "| shards | beam | sharded q/s | one shard q/s | time, sharded / one shard |", "|---|---|---|---|---|"]
    for shards in args.shards:
      sharded = ShardedSubstringConstraint.from_shards(
          SuffixArrayIndex.build_shards(pieces * args.copies[0], SEP, shards), vocab_size=vocab, eos_id=EOS,
          top_m=args.top_m)
      for beams in args.beams:
        r = interleaved({"one": decode_call(model, cache, first, one, beams, args.steps),
                         "sharded": decode_call(model, cache, first, sharded, beams, args.steps)},
                        ROUNDS, BLOCK_SECONDS)
        for x, y in zip(jax.tree.leaves(r["sharded"].result), jax.tree.leaves(r["one"].result)):
          assert np.array_equal(np.asarray(x), np.asarray(y))
        dec.append(f"| {shards} | {beams} | {args.batch / r['sharded'].seconds:.1f} | "
                   f"{args.batch / r['one'].seconds:.1f} | {round_ratio(r, 'sharded', 'one'):.2f}x |")
        print(dec[-1], flush=True)
  cmd = f"PYTHONPATH=. {python_command()} benchmarks/" + " ".join([pathlib.Path(__file__).name] +
                                                               (argv if argv else sys.argv[1:]))
  section = ["## Index build", "",
             f"Command: `{cmd}`  ", f"Machine: {cpu_model()}, {os.cpu_count()} cores (the build runs there; "
             f"load average {os.getloadavg()[0]:.1f} at the end), jax {jax.__version__}, decode on "
             f"{jax.default_backend()} ({jax.devices()[0].device_kind}); {HOST_MALLOC}.", "",
             "Suffix-array build on SciFact (pydivsufsort; best of 3; separators counted as tokens):", "",
             *lines, *dec, ""]
  text = "\n".join(section)
  print(text)
  if args.write_docs:
    gpu = None if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    write_section(str(ROOT / "docs" / "benchmarks.md"), "## Index build", text.split("\n", 1)[1], gpu)
  return 0


if __name__ == "__main__":
  sys.exit(main())
