# make demo: install into .venv and run the quickstart study on the embedded digits, then print its table.
# make test: install into .venv (with test extras) and run the test suite without the tests marked slow.
# make test-all: every test, the slow ones included (PostgreSQL, SLURM, chaos soak, DDP failures): what .ci/run runs.
# make results: run the CIFAR-10 studies (hours on 2 cores; resumable, two processes share the queue) and write
#   docs/results/ (MAE_LAB_DATA must hold cifar10/, e.g. MAE_LAB_DATA=../shared/data).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/mae-lab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/mae-lab

demo: install  # one thread, as the README's time was measured
	OMP_NUM_THREADS=1 $(BIN)/mae-lab run studies/quickstart.toml
	$(BIN)/mae-lab report quickstart

# One torch thread per process (tiny models, two-process tests): the six slowest test files took 305 s instead of
# 358 s with torch's default threads on 2 Xeon cores (1.17x).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

STUDIES := recipe baseline mask_ratio mask_token mask_sampling recon_target augmentation decoder_depth decoder_width
RESULTS_DB ?= db/results.db

# Breadth first: one round of every study at a time (adaptive seeds: 2 seeds, then up to 4 more rounds of one), so
# a run stopped early leaves every study at the same depth; then each study to its end. Each process: 1 thread.
RUN := OMP_NUM_THREADS=1 $(BIN)/mae-lab run --db $(RESULTS_DB)
RUN_STUDIES := for pass in 1 2 3 4 5; do for s in $(STUDIES); do $(RUN) studies/$$s.toml --rounds 1 || exit 1; done; \
	done; for s in $(STUDIES); do $(RUN) studies/$$s.toml || exit 1; done

results: install
	($(RUN_STUDIES)) & ($(RUN_STUDIES)); a=$$?; wait $$! && test $$a = 0
	$(BIN)/mae-lab report --all --db $(RESULTS_DB) --out docs/results

.PHONY: install demo test test-all results
