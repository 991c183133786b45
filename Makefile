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
# 5-10 s an import on a 2-vCPU VM) and waiting for their ranks, which a second worker overlaps. Each worker runs
# torch on one thread (tests/conftest.py): with a thread a core in each, their OpenMP threads spun waiting for each
# other (a Xeon 6 VM, 2026-12-07: 593 s in a fresh-clone CI run, one thread a worker 351 s, 1781 tests; earlier
# figures, other VMs: 946 s in one process, 689 s in two).
# --dist worksteal: an idle worker takes tests queued for the other, which the slow DDP tests at the end of the
# queue had left to one worker (same VM, 2026-12-08, 1928 tests: 579 s with the default `load`, 418 s with it).
# `python -m pytest tests/...` runs in one.
test: setup
	$(BIN)/python -m pytest -n 2 --dist worksteal

bench: setup
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf demo_out mlruns mlflow.db
