# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.beampilot-installed
OUT ?= demo-output

.PHONY: demo test venv clean benchmark

venv: $(STAMP)

# constraints.txt pins the versions this tree is tested with; torch==2.13.0 is the CPU build on disk.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "beampilot needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/beampilot demo sas-qscan --out $(OUT)

# two workers (pytest-xdist): the integration tests mostly wait on their servers, so two share
# 2 cores well (5-7 min instead of ~9). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# the benchmarks also need what they compare against (gpCAM, Xopt): the [bench] extra
BENCH_STAMP := $(VENV)/.beampilot-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

benchmark: $(BENCH_STAMP)
	$(BIN)/python benchmarks/qsampling.py
	$(BIN)/python benchmarks/mapping.py
	$(BIN)/python benchmarks/tuning.py
	$(BIN)/python benchmarks/moga.py
	$(BIN)/python benchmarks/detector_ml.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
