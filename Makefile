# Two commands set up and run everything: `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch a machine without one gets: the CPU build. A venv that already has torch keeps it.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
TRAIN_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: venv train test lint typecheck bench gpu-wheels mutants clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	# Pin whatever torch is now installed, so no later resolution can swap in another build.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PIP) install --quiet -c $(VENV)/constraints.txt -e ".[data,deepspeed,plot,bench,slurm,eval,dev]"
	touch $(STAMP)

train: venv
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer.main \
		run.name=train-$$(date +%Y%m%d-%H%M%S) $(TRAIN_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest

# Realistic bugs in ramp's core, each caught by the tests that claim to (about 15 minutes); see README.
mutants: venv
	$(PY) -m tests.mutants

# Throughput against a bare PyTorch loop and the HF Trainer; prints a table (about 15 minutes).
bench: venv
	$(PY) -m bench.train
	$(PY) -m bench.checkpoint
	$(PY) -m bench.data

# The pure-Python packages the GPU machine lacks, as wheels in .whl/ pinned to this venv's versions;
# bench/gpu.sh installs them there (see README, Performance). antlr4-python3-runtime is published as an
# sdist only, so when no wheel downloads, one is built here (it is pure Python).
GPU_WHEELS := hydra-core omegaconf antlr4-python3-runtime
gpu-wheels:
	test -x $(PY) || { echo "make venv first: the versions come from $(VENV)"; exit 1; }
	rm -rf .whl && mkdir -p .whl
	set -e; for pkg in $(GPU_WHEELS); do \
		spec="$$pkg==$$($(PIP) show $$pkg | sed -n 's/^Version: //p')"; \
		$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$$spec" 2>/dev/null \
			|| { echo "no wheel of $$spec on the index: building one"; \
				$(PIP) wheel --quiet --no-deps -w .whl "$$spec"; }; \
	done
	ls .whl

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
