#!/usr/bin/env bash
# Prepares, on this CPU machine, the two folders `benchmarks/gpu_run.sh` needs carried to a lent GPU machine, so a
# device session spends none of its minutes on set-up. Run from the repository root (idempotent; network to the
# package index needed once, for the wheels):
#
#   bash benchmarks/gpu_prepare.sh            # builds .whl/ and .devdata/, lists them, checks the carry limit
#
# then one device call (the tool's `carry` takes ignored paths; these two are ignored through .git/info/exclude):
#   run(command="OUT=$OUT bash benchmarks/gpu_run.sh 555", carry=[".whl", ".devdata"], timeout_s=600)
#
# What it makes (the list is gpu_run.sh's header):
#   .whl/      gin-config 0.5.0 and pydivsufsort 0.0.20 wheels for CPython 3.12 manylinux (the device image's Python;
#              override with WHEEL_PYTHON=3.13 etc.)
#   .devdata/  data/scifact and data/tokenizers/sentencepiece_botchan (copies of $GENRET_SHARED_DATA, default
#              ../shared/data), cache/scifact_unigram_8190_seed0.model (+ .vocab: the n-gram benchmark's SentencePiece
#              model, trained here once as `decode_throughput.py --parts ngram` would) and an empty jax_cache/
#              (an earlier call's returned jax_cache.tgz is unpacked into it by hand; see gpu_run.sh)
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
SHARED=${GENRET_SHARED_DATA:-../shared/data}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}
CARRY_LIMIT_MB=64   # the device tool's limit on carried paths, all together

[ -f benchmarks/gpu_run.sh ] || { echo "gpu_prepare.sh: run it from the repository root" >&2; exit 2; }
for f in scifact/corpus.jsonl.gz scifact/queries.jsonl tokenizers/sentencepiece_botchan/botchan_en_unigram_1000.model; do
  [ -f "$SHARED/$f" ] || { echo "gpu_prepare.sh: $SHARED/$f: not found (set GENRET_SHARED_DATA)" >&2; exit 2; }
done

# Ignored, so neither `git status` nor a commit picks them up; the device tool then carries them only when named.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for p in /.whl/ /.devdata/; do
  grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"
done

mkdir -p .whl
if ! ls .whl/gin_config-0.5.0-*.whl .whl/pydivsufsort-0.0.20-*.whl > /dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gin-config==0.5.0 pydivsufsort==0.0.20
fi

mkdir -p .devdata/data/tokenizers .devdata/cache .devdata/jax_cache
rm -rf .devdata/data/scifact .devdata/data/tokenizers/sentencepiece_botchan
cp -r "$SHARED/scifact" .devdata/data/scifact
cp -r "$SHARED/tokenizers/sentencepiece_botchan" .devdata/data/tokenizers/sentencepiece_botchan

# The same function and settings the benchmark uses, so the device run finds its model in the cache and trains none.
GENRET_SHARED_DATA=$PWD/.devdata/data GENRET_BENCH_CACHE=$PWD/.devdata/cache PYTHONPATH=$PWD/benchmarks:$PWD \
  TF_CPP_MIN_LOG_LEVEL=3 "$PY" -c "
import decode_throughput as d
sp, how = d.scifact_spm(None, d.scifact_texts()[0], print)
print('SentencePiece model:', how, '-', sp.get_piece_size(), 'pieces')
"
rm -f .devdata/cache/scifact_corpus.txt   # the model's training text: not needed to run, 10 MB to carry

ls -l .whl
du -sh .devdata/*
size=$(du -smc .whl .devdata | tail -1 | cut -f1)
if ((size >= CARRY_LIMIT_MB)); then
  echo "gpu_prepare.sh: .whl + .devdata are ${size} MB, over the ${CARRY_LIMIT_MB} MB carry limit" >&2
  exit 1
fi
echo "ready: .whl + .devdata ${size} MB (carry limit ${CARRY_LIMIT_MB} MB)"
