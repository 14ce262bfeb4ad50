# The two commands: `make demo` (end-to-end pipeline on a real public sample) and `make test`.
# Both create the virtual environment themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# A local folder holding the CPU torch wheel (this machine's image ships one); elsewhere the
# PyTorch CPU index is used. A plain `torch` requirement would pull the multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_WHEELS ?= /opt/wheels
ifneq ($(wildcard $(TORCH_WHEELS)/torch-$(TORCH_VERSION)*cpu*.whl),)
TORCH_SOURCE := --find-links $(TORCH_WHEELS)
else
TORCH_SOURCE := --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
endif
DEMO_DIR ?= demo_out
CELLTYPIST_VERSION := 1.7.1

export RAY_AUTH_MODE := disabled
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv services demo test lint docs typecheck bench bench-perturb bench-scale clean lock images

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "uv>=0.4"
	$(UV) pip install -q --compile-bytecode --python $(PY) $(TORCH_SOURCE) "torch==$(TORCH_VERSION)"
	$(UV) pip install -q --compile-bytecode --python $(PY) $(TORCH_SOURCE) "torch==$(TORCH_VERSION)" -e ".[dev,bench]"
	@touch $@

# The demo sample: celltypist's wheel ships 559 real cells (whole transcriptome, gene symbols) and
# a GENCODE v44 id->symbol table. Fetched from the package index, never committed.
$(DEMO_DIR)/raw/sample_cell_by_gene.csv: | $(VENV)/.installed
	mkdir -p $(DEMO_DIR)/raw
	$(PY) -m pip download -q --disable-pip-version-check --no-deps \
		"celltypist==$(CELLTYPIST_VERSION)" -d $(DEMO_DIR)/raw
	cd $(DEMO_DIR)/raw && $(abspath $(PY)) -m zipfile -e celltypist-$(CELLTYPIST_VERSION)-py3-none-any.whl wheel
	cp $(DEMO_DIR)/raw/wheel/celltypist/data/samples/sample_cell_by_gene.csv $(DEMO_DIR)/raw/
	cp $(DEMO_DIR)/raw/wheel/celltypist/data/samples/GENCODEv44_Gene_id2name.csv $(DEMO_DIR)/raw/
	rm -rf $(DEMO_DIR)/raw/wheel

demo: $(VENV)/.installed $(DEMO_DIR)/raw/sample_cell_by_gene.csv
	$(PY) jobs/demo.py --raw $(DEMO_DIR)/raw --out $(DEMO_DIR)

# PostgreSQL for the MLflow-server tests (Debian's package; the tests start it on 127.0.0.1 themselves).
# Needs root; without it the tests that use it skip and say why (CI installs it and never skips).
services:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "postgresql present"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "postgresql missing and not root: the MLflow-server tests will skip"; fi

test: $(VENV)/.installed services
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check platform tests jobs benchmarks
	$(VENV)/bin/ruff format --check platform tests jobs benchmarks
	$(VENV)/bin/mypy
	PYTHONPATH=platform $(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $$(mktemp -d)

# The docs site (one page per stage, performance, the API reference from the docstrings) into site/.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_medians.py
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_small.py
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/bench_peft.py
	$(PY) benchmarks/bench_finetune_packed.py
	$(PY) benchmarks/report.py

bench-perturb: $(VENV)/.installed
	$(PY) benchmarks/bench_perturb.py
	$(PY) benchmarks/bench_perturb_stats.py
	$(PY) benchmarks/report.py

bench-scale: $(VENV)/.installed
	$(PY) benchmarks/bench_scale.py

# uv.lock: what the cluster images install (deploy/Dockerfile). Rerun after changing dependencies.
lock: $(VENV)/.installed
	$(UV) lock

# The two cluster images, built from uv.lock and pushed: REGISTRY is yours (e.g. ghcr.io/my-org,
# 123456789012.dkr.ecr.eu-west-1.amazonaws.com); TAG defaults to the package version.
REGISTRY ?= ghcr.io/your-org
TAG ?= $(shell sed -n 's/^VERSION: Final = "\(.*\)".*/\1/p' platform/rankformer/schema.py)
images:
	docker build -f deploy/Dockerfile -t $(REGISTRY)/rankformer:$(TAG) .
	docker build -f deploy/Dockerfile --build-arg TORCH=gpu -t $(REGISTRY)/rankformer-cuda:$(TAG) .
	docker push $(REGISTRY)/rankformer:$(TAG)
	docker push $(REGISTRY)/rankformer-cuda:$(TAG)
	@echo "then: cd deploy/kuberay && kustomize edit set image rankformer=$(REGISTRY)/rankformer:$(TAG) rankformer-cuda=$(REGISTRY)/rankformer-cuda:$(TAG) && kubectl apply -k ."

clean:
	rm -rf $(VENV) $(DEMO_DIR) site .pytest_cache .mypy_cache .ruff_cache ray_results mlruns mlartifacts mlflow.db
