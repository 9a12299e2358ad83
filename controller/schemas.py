"""The upstream CRD schemas (PyTorchJob, TrainJob, PodMonitor, ...) as validators for rendered objects.

The schema folder is $DAT_SCHEMA_DIR, else ../shared/schemas next to the repository; `make schemas
SCHEMA_DIR=DIR` downloads the same files from upstream at the pinned tags.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT.parent / "shared" / "schemas"
# (apiVersion, kind) -> CRD file, as named upstream
CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


class SchemaMissing(RuntimeError):
    """The CRD schema folder or a file in it is missing; the message says how to get it."""


def schema_dir() -> Path:
    configured = os.environ.get("DAT_SCHEMA_DIR")
    return Path(configured) if configured else DEFAULT_DIR


def crd_path(api_version: str, kind: str) -> Path:
    name = CRD_FILES.get((api_version, kind))
    if name is None:
        raise KeyError(f"no CRD schema known for {api_version} {kind}")
    path = schema_dir() / name
    if not path.is_file():
        if os.environ.get("DAT_SCHEMA_DIR"):
            raise SchemaMissing(f"DAT_SCHEMA_DIR={os.environ['DAT_SCHEMA_DIR']}: {name} not found there")
        raise SchemaMissing(f"CRD schema {path} not found: run `make schemas SCHEMA_DIR=DIR` "
                            "and set DAT_SCHEMA_DIR=DIR")
    return path


def _strict(node: Any) -> Any:
    """The API server prunes (or, with strict field validation, rejects) fields a structural schema does not
    declare; JSON Schema allows them. Closing every declared object makes a typo fail here too."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.lru_cache(maxsize=None)
def _validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(path.read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft7Validator(_strict(entry["schema"]["openAPIV3Schema"]))
    raise SchemaMissing(f"{path}: no version {version}")


def has_crd(obj: dict[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CRD_FILES


def crd_problems(obj: dict[str, Any]) -> list[str]:
    """Where the object breaks its CRD's openAPIV3Schema, one line each."""
    validator = _validator(crd_path(obj["apiVersion"], obj["kind"]), obj["apiVersion"].split("/")[-1])
    out = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"{where}: {error.message[:300]}")
    return out
