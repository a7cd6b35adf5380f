#!/usr/bin/env bash
# The GPU benchmarks, in one call on a lent GPU machine (a bare image with jax/flax/optax/torch/transformers but
# no seqio, TensorFlow, gin-config or pydivsufsort, and no network). Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh [seconds, default 580: give the call a 600 s limit]
#   STEPS="decode_trie decode_ngram" NGRAM_BEAMS="20 1" OUT=... bash benchmarks/gpu_run.sh 480   # these steps, in order
#   STEPS=decode_llama ...   # the LLaMA prefix-LM decode rows (not in the default steps)
#   NGRAM_VARIANTS="enum_iters=64 topk_block=0"   # biased n-gram settings also timed in the same rounds (default
#       none; session 15 timed these two, the settings before session 13's accelerator defaults, on an H100)
#
# Session 4 (H100) timings: jax compiles 13-42 s per train rung and ~10-30 s per decode program there. The first
# search of each decode shape pays most of it (most likely GEMM autotuning, docs/decoding.md; the rows'
# `*_first_call_s`): H100 (session 11) 30-34 s at beam 20, 10 s at beam 1; H200 (session 13) 43-57 s for the
# tiny rows and 69-103 s for the 42M ones, so decode_trie runs one sub-step per size (tiny ~300 s, 42M ~330 s:
# nearly a whole call; the H200 table of session 13 has all four rows, docs/benchmarks.md). The step limits below
# are what the figures in docs/benchmarks.md needed; the four train rungs need ~220 s.
#
# Needs, carried with the call (`bash benchmarks/gpu_prepare.sh` makes both here and lists them in
# .git/info/exclude, so git ignores them; then run(..., carry=[".whl", ".devdata"])):
#   .whl/      gin-config 0.5.0 and pydivsufsort 0.0.20 wheels for the machine's Python 3.12
#   .devdata/  data/scifact and data/tokenizers/sentencepiece_botchan (copies of ../shared/data/...),
#              cache/scifact_unigram_8190_seed0.model (+ .vocab: the n-gram benchmark's seeded SentencePiece model)
#              and jax_cache/ (below)
# Dry run of the plumbing on this CPU machine (writes CPU tables into docs/benchmarks.md: `git checkout` it after):
#   PY=.venv/bin/python DEVICE=cpu STEPS="index cgl" OUT=/tmp/gpu_dry bash benchmarks/gpu_run.sh 300
# Each step has its own time limit so a slow compile cannot take the others' time; each writes its own
# docs/benchmarks.md subsection ("### GPU: <card>"), copied to $OUT after every step, so what finished comes back
# even when the machine's time runs out. The decode parts run separately and are merged by --from_json.
# The decode parts rewrite their --json_out after every row (marked partial until the end), so a step that runs
# out of time still merges the rows it finished.
# Logs and JSON go to $WORK, packed into $OUT/results.tgz after every step ($OUT returns few files). The n-gram
# step also traces one call of each of our methods at its largest beam (--profile_dir); they come back as
# $OUT/profiles.tgz (when under 16 MB): tar xzf it here, then .venv/bin/python benchmarks/read_profile.py <dirs>.
#
# XLA's persistent compilation cache lives in .devdata/jax_cache and comes back as $OUT/jax_cache.tgz (when under
# 40 MB): compiling is most of a GPU call (session 11, H100: 30-34 s for the first beam-20 search program, the tiny
# models' init and HF set-up 35 s), and a later call on the same card, jax and code reuses the programs. Before
# the next call: rm -rf .devdata/jax_cache && mkdir -p .devdata/jax_cache && tar xzf <files_at>/jax_cache.tgz \
#   -C .devdata/jax_cache   (the tables then time the same programs; only the `*_first_call_s` fields change).
set -u
PY=${PY:-python3}
DEVICE=${DEVICE:-gpu}
OUT=${OUT:-/tmp/genret_gpu_out}
WORK=/tmp/genret_gpu_work
PROF=/tmp/genret_gpu_prof   # jax.profiler traces of the n-gram step's largest-beam row, returned as $OUT/profiles.tgz
BUDGET=${1:-580}
mkdir -p "$OUT" "$WORK"
if [ "$DEVICE" != cpu ]; then   # the CPU dry run takes them from the venv
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/gin_config-*.whl .whl/pydivsufsort-*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export JAX_DEFAULT_MATMUL_PRECISION=highest   # fp32 on both sides: torch's matmuls are not TF32 either
export GENRET_SHARED_DATA=$PWD/.devdata/data GENRET_BENCH_CACHE=$PWD/.devdata/cache
export JAX_COMPILATION_CACHE_DIR=$PWD/.devdata/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
echo "compilation cache at start: $(find "$JAX_COMPILATION_CACHE_DIR" -type f | wc -l) files"
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$WORK/nvidia_smi.txt"
$PY -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__)" \
  2>&1 | tail -1 | tee "$WORK/env.txt"

STEPS=${STEPS:-decode_ngram index decode_trie cgl train}
step() {   # step NAME SECONDS CMD...: at most SECONDS, never past the budget
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "== $name skipped: budget spent"; return; fi
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s in)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo "rc=$?" >> "$WORK/$name.log"
  grep -v "^\s*$" "$WORK/$name.log" | grep -iv "warn" | tail -4
  save
}
save() {
  cp docs/benchmarks.md "$OUT/benchmarks.md"; tar czf "$OUT/results.tgz" -C "$WORK" .
  if [ -d "$PROF" ]; then   # one traced call per method (the n-gram step's largest beam), read back here
    tar czf "$OUT/profiles.tgz" -C "$PROF" .
    (($(du -m "$OUT/profiles.tgz" | cut -f1) < 16)) || { rm -f "$OUT/profiles.tgz"; echo "profiles over 16 MB: not returned"; }
  fi
  if (($(du -sm "$JAX_COMPILATION_CACHE_DIR" | cut -f1) < 40)); then
    tar czf "$OUT/jax_cache.tgz" -C "$JAX_COMPILATION_CACHE_DIR" .
  else
    rm -f "$OUT/jax_cache.tgz"; echo "compilation cache over 40 MB: not returned"
  fi
}

# Default order: most informative first; a later step is skipped cleanly when the budget is spent.
run_step() {
  case $1 in
    decode_ngram) step decode_ngram 330 $PY benchmarks/decode_throughput.py --device $DEVICE --parts ngram \
      --ngram_beams ${NGRAM_BEAMS:-1 20} --repeats 2 --json_out "$WORK/decode_ngram.json" \
      --ngram_biased_variants ${NGRAM_VARIANTS:-} --profile_dir "$PROF" ;;
    index) step index 150 $PY benchmarks/index_build.py --copies 1 16 --beams 1 20 --shards --write_docs ;;
    decode_trie)   # one sub-step per size, each with its own limit and JSON (merged per size and beam)
      step decode_trie_tiny 300 $PY benchmarks/decode_throughput.py --device $DEVICE --parts peak trie \
        --sizes tiny --beams 1 20 --repeats 2 --json_out "$WORK/decode_trie_tiny.json"
      step decode_trie_base45m 330 $PY benchmarks/decode_throughput.py --device $DEVICE --parts trie \
        --sizes base45m --beams 20 1 --repeats 2 --json_out "$WORK/decode_trie_base45m.json" ;;
    decode_llama)   # not in the default STEPS (the budget): STEPS=decode_llama; merged into its own section
      step decode_llama 330 $PY benchmarks/decode_throughput.py --device $DEVICE --parts peak trie \
        --sizes llama42m --beams 20 1 --repeats 2 --json_out "$WORK/decode_llama.json" ;;
    cgl) step cgl 80 $PY benchmarks/cgl_throughput.py --device $DEVICE --rungs r0,r5 --repeats 2 --ref_seconds 2 ;;
    train) step train 220 $PY benchmarks/train_throughput.py --device $DEVICE --family both --rungs r0,r2 \
      --seconds 3 --repeats 3 ;;
    *) echo "unknown step $1"; exit 1 ;;
  esac
}
for name in $STEPS; do run_step "$name"; done
ls "$WORK"/decode_*.json >/dev/null 2>&1 && $PY benchmarks/decode_throughput.py --from_json "$WORK"/decode_*.json \
  --write_docs > "$WORK/decode_merge.log" 2>&1
save
echo "done in $(( $(date +%s) - START ))s"
