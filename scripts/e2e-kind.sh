#!/usr/bin/env bash
# End to end on a throw-away kind cluster: training operator v1.9, the trainer image, the CPU smoke job
# (manifests/specs/dat-smoke.yaml: synthetic data, small CNN, 2 pods) until it Succeeds.
# Needs Docker and kind (https://kind.sigs.k8s.io); kubectl and helm come from `make tools`.
# Run it as `make e2e-kind`. KEEP_CLUSTER=1 leaves the cluster up; E2E_TIMEOUT (seconds) bounds the run.
set -euo pipefail

CLUSTER=${CLUSTER:-dat-e2e}
OPERATOR_REF=${OPERATOR_REF:-v1.9.4}
IMAGE_TAG=${IMAGE_TAG:-e2e}
E2E_TIMEOUT=${E2E_TIMEOUT:-1800}
DATCTL=${DATCTL:-datctl}
CONTEXT="kind-${CLUSTER}"
cd "$(dirname "$0")/.."

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool not found (Docker and kind are needed; make tools gives kubectl)" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e-kind: no Docker engine reachable" >&2; exit 2; }

cleanup() {
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "== kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s

echo "== Kubeflow training operator $OPERATOR_REF"
kubectl --context "$CONTEXT" apply --server-side \
  -k "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=${OPERATOR_REF}"
kubectl --context "$CONTEXT" -n kubeflow rollout status deployment/training-operator --timeout=300s

echo "== trainer image dat-k8s:$IMAGE_TAG"
make image IMAGE="dat-k8s:${IMAGE_TAG}"
kind load docker-image "dat-k8s:${IMAGE_TAG}" --name "$CLUSTER"

echo "== smoke job"
"$DATCTL" delete dat-smoke --context "$CONTEXT" >/dev/null 2>&1 || true
"$DATCTL" submit manifests/specs/dat-smoke.yaml --context "$CONTEXT" \
  --set image.tag="$IMAGE_TAG" --set image.pullPolicy=Never
if "$DATCTL" watch dat-smoke --context "$CONTEXT" --interval 10 --timeout "$E2E_TIMEOUT"; then
  "$DATCTL" status dat-smoke --context "$CONTEXT"
  echo "e2e-kind: dat-smoke Succeeded"
else
  "$DATCTL" status dat-smoke --context "$CONTEXT" || true
  "$DATCTL" logs dat-smoke --context "$CONTEXT" || true
  "$DATCTL" logs dat-smoke --replica worker-0 --context "$CONTEXT" || true
  echo "e2e-kind: dat-smoke did not succeed" >&2
  exit 1
fi
