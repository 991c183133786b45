# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch 2.13.0 resolves to the CPU wheel on disk; torchrec goes in with --no-deps (its metadata wants the
# CUDA fbgemm-gpu, the CPU build fbgemm-gpu-cpu is listed in pyproject.toml instead).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/python -c "import torchrec, lightning, mlflow; print('environment ready')"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m mmoe_rec.demo --workdir demo_out

# two pytest workers (pytest-xdist): most of the suite's time is processes starting (torch + Lightning + MLflow:
# 8-10 s an import on a slow 2-vCPU VM) and waiting for their ranks, which a second worker overlaps
# (a Zen 3 VM, 2026-12-07: 946 s in one process, 689 s in two; 557-690 s in two, three fresh-clone CI runs, once the
# tracking tests' MLflow stores were copies, tests/conftest.py; 462-535 s, three runs, once the DDP numerics tests
# forked their ranks and `mmoe-rec` skipped the interpreter's module teardown; all the DDP tests on one worker,
# --dist loadgroup, took 561 s; a Zen 4 VM, 2026-12-07: 377 s; a Xeon 6 VM, 2026-12-07: 307 s, 1383 tests; 386 s,
# 1541 tests that afternoon; 472 s, 1570 tests, at 14:40 UTC in a spell when the large model's step ran 25 % slower
# than that morning).
# `python -m pytest tests/...` runs in one.
test: setup
	$(BIN)/python -m pytest -n 2

bench: setup
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf demo_out mlruns mlflow.db
