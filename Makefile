# The two commands of the README: `make demo` and `make test`. Each sets up .venv from scratch when needed.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

# Installs the full lock with --no-deps (byte-for-byte the tested set); `make install-resolve` does the
# two-stage resolve from requirements/{base,nodeps,test}.txt instead (see docs/install.md).
$(STAMP): requirements/lock.txt setup.cfg
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q --no-deps -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install-resolve:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements/base.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install -q -r requirements/test.txt
	$(BIN)/pip install -q --no-deps -e .

lock:
	(echo "# Full transitive lock (pip freeze of the two-stage install on Python 3.11.7), installed with --no-deps."; \
	 echo "# Regenerate: make lock"; $(BIN)/pip freeze --all --exclude pip --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/') > requirements/lock.txt

.PHONY: install install-resolve lock demo test bench gpu-prepare clean
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/genret demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Every benchmark against its peer, on this machine (an hour or more on 2 cores: run it on a quiet machine);
# each rewrites its own section of docs/benchmarks.md. On a lent GPU: benchmarks/gpu_run.sh, with what
# `make gpu-prepare` builds here carried (.whl, .devdata).
bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py --family both --rungs r0,r2
	$(BIN)/python benchmarks/cgl_throughput.py --rungs r0,r5
	$(BIN)/python benchmarks/decode_throughput.py --repeats 2 --write_docs
	$(BIN)/python benchmarks/decode_throughput.py --parts peak trie --sizes llama42m --repeats 2 --write_docs
	$(BIN)/python benchmarks/index_build.py --write_docs
	$(BIN)/python benchmarks/bench_ngram_scoring.py
	$(BIN)/python benchmarks/span_sampling.py --write_docs

gpu-prepare: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu_prepare.sh

clean:
	rm -rf $(VENV) build *.egg-info
