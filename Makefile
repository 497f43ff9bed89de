# Both targets create and reuse .venv in the repo root, installing only pinned versions.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorafit-installed

.PHONY: demo test test-clients test-install lint bench blueprints clean fuzz

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and alone, so pip takes the local CPU wheel and never a CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# The proofs against real clients that take a long first build: llama-cpp-python compiles llama.cpp (about 8 min
# on 2 cores, then pip's wheel cache makes it seconds). mlx-lm's proof needs no build and runs in `make test`.
CLIENTS_STAMP := $(VENV)/.lorafit-clients-installed
$(CLIENTS_STAMP): requirements-clients.lock $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q --disable-pip-version-check -r requirements-clients.lock
	touch $(CLIENTS_STAMP)

# Microsoft's SARIF multitool (npm registry), which carries the SARIF 2.1.0 schema and validates a log against it.
SARIF_TOOL := build/sarif/node_modules/@microsoft/sarif-multitool-linux
$(SARIF_TOOL)/sarif-2.1.0.json:
	mkdir -p build/sarif
	cd build/sarif && npm install --silent --no-audit --no-fund --prefix . @microsoft/sarif-multitool@5.7.0 \
		@microsoft/sarif-multitool-linux@5.7.0

test-clients: $(CLIENTS_STAMP) $(SARIF_TOOL)/sarif-2.1.0.json
	LORAFIT_CLIENTS=1 LORAFIT_SARIF_TOOL=$(SARIF_TOOL) $(VENV)/bin/pytest tests/clients

# The README's Install section, as a library user follows it: a fresh venv, torch first, then lorafit with the tested
# versions; then the CLI runs the demo there.
INSTALL_VENV := build/install-venv
test-install:
	rm -rf $(INSTALL_VENV)
	python3 -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(INSTALL_VENV)/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock ".[gguf]"
	cd build && ../$(INSTALL_VENV)/bin/lorafit --version
	cd build && ../$(INSTALL_VENV)/bin/lorafit demo
	rm -rf $(INSTALL_VENV)

# Fuzz the five commands with mutated inputs for FUZZ_SECONDS (make fuzz FUZZ_SECONDS=60); a new violation is
# saved to tests/fuzz/corpus/, which `make test` replays.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	$(PY) tools/fuzz.py --seconds $(FUZZ_SECONDS)

bench: $(STAMP)
	$(PY) bench/bench_merge.py
	$(PY) bench/bench_families.py
	$(PY) bench/bench_scan.py

# Regenerate src/lorafit/blueprints/ for the pinned transformers (a few minutes); commit the result.
blueprints: $(STAMP)
	$(PY) tools/make_blueprints.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
