"""The Helm chart as datctl's renderer.

One source of truth: `datctl render` runs `helm template` on charts/dat-training with the job spec as its
values file, so for the same values helm and datctl render the same run objects (RUN_TEMPLATES; helm alone
also renders the dashboard, the alerts and the exporter). Python adds what a template cannot do: the
trainer-config validation of trainer/config.py, reading trainerConfigFile (which the chart refuses), and
checks with one clear line per problem before anything is rendered.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml

from trainer import config as trainer_config

ROOT = Path(__file__).resolve().parents[1]
# The templates datctl renders; the chart's other objects (exporter, dashboard, alerts) are helm-only.
RUN_TEMPLATES = ("configmap.yaml", "serviceaccount.yaml", "networkpolicy.yaml", "pytorchjob.yaml", "trainjob.yaml",
                 "podmonitor.yaml")
COMPONENT = "app.kubernetes.io/component"
MONITORING_API = "monitoring.coreos.com/v1"


class ChartError(RuntimeError):
    """helm or the chart is missing or failed; one line."""


def chart_dir() -> Path:
    return Path(os.environ.get("DAT_CHART", ROOT / "charts" / "dat-training"))


def helm_binary() -> str:
    chosen = os.environ.get("DAT_HELM")
    if chosen:  # named on purpose: another helm found instead would hide the mistake
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise ChartError(f"DAT_HELM={chosen}: not an executable file (unset it to use helm from PATH or ./bin)")
        return chosen
    candidates = [shutil.which("helm"), str(ROOT / "bin" / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ChartError("helm not found: install helm >= 3.8 (or run `make tools`), or set DAT_HELM")


def chart_file(name: str) -> Path:
    """A file of the chart; ChartError naming the path (and DAT_CHART when set) when it is missing."""
    path = chart_dir() / name
    if not path.is_file():
        where = f"DAT_CHART={os.environ['DAT_CHART']}; " if os.environ.get("DAT_CHART") else ""
        raise ChartError(f"chart not found: {path} does not exist ({where}set DAT_CHART to the dat-training "
                         "chart folder)")
    return path


def chart_values() -> dict[str, Any]:
    """The chart's default values (the defaults of every job spec)."""
    return yaml.safe_load(chart_file("values.yaml").read_text()) or {}


def values_schema() -> dict[str, Any]:
    path = chart_file("values.schema.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ChartError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno})") from None


def helm_template(values: dict[str, Any], release: str, namespace: str,
                  api_versions: tuple[str, ...] = (MONITORING_API,)) -> list[tuple[str, dict]]:
    """`helm template` with these values: (template file name, object) for each rendered object."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="datctl-values-") as fh:
        # JSON (which helm reads as YAML): every string stays a string; YAML 1.1 output would leave e.g. 1e3 or
        # 0x10 unquoted, which helm's YAML reads as numbers
        json.dump(values, fh, default=str)
        fh.flush()
        cmd = [helm_binary(), "template", release, str(chart_dir()), "--namespace", namespace, "-f", fh.name]
        for api in api_versions:
            cmd += ["--api-versions", api]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        text = proc.stderr[proc.stderr.find("Error:"):] if "Error:" in proc.stderr else proc.stderr
        raise ChartError(f"helm template failed: {' '.join(text.split()) or proc.returncode}")
    return parse_rendered(proc.stdout)


def run_objects(rendered: list[tuple[str, dict]]) -> list[dict]:
    """The objects of one training run among `helm template`'s: those of RUN_TEMPLATES, less the exporter's
    (a namespace's exporter is installed with helm, once)."""
    return [obj for source, obj in rendered if source in RUN_TEMPLATES
            and obj["metadata"].get("labels", {}).get(COMPONENT) != "exporter"]


def parse_rendered(text: str) -> list[tuple[str, dict]]:
    """Split `helm template` output into (template file name, object), skipping empty documents."""
    out = []
    for doc in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        match = re.search(r"^# Source: [^/]+/templates/(\S+)", doc, flags=re.MULTILINE)
        obj = yaml.safe_load(doc)
        if obj:
            out.append((match.group(1) if match else "", obj))
    return out


# ---- values.schema.json: the `trainer` section mirrors trainer/config.py ----------------------------------

# A number, or a string trainer.config reads as one: helm --set passes 0.001 as a string, and papers write
# eps as a fraction, e.g. "8/255" (trainer.config divides it out).
_NUMBER = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": (
    r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$|^\s*[0-9.]+\s*/\s*[0-9.]+\s*$")}]}


def _field_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return _NUMBER
    if tp is str:  # trainer.config coerces scalars to str (e.g. jointspar.sample_every: 10)
        return {"type": ["string", "number", "boolean"]}
    if origin is tuple:
        args = typing.get_args(tp)
        return {"type": "array", "items": _NUMBER, "minItems": len(args), "maxItems": len(args)}
    if origin is list:
        return {"type": "array", "items": _NUMBER}
    raise TypeError(f"no JSON schema for trainer config type {tp!r}")


def _choice_schema(allowed: tuple[str, ...]) -> dict[str, Any]:
    # trainer.config reads YAML 1.1 booleans in a string field as on / off (helm's YAML reads `off` as false)
    booleans = [b for b, word in ((True, "on"), (False, "off")) if word in allowed]
    return {"enum": [*allowed, *booleans]}


def trainer_schema() -> dict[str, Any]:
    """JSON schema of a trainer config: known sections and keys with their types, and the allowed values of
    choice fields (helm rejects typos and unknown choices; ranges and cross-field rules are datctl's)."""
    sections = {}
    choices = trainer_config.CHOICES
    for section in dataclasses.fields(trainer_config.Config):
        hints = typing.get_type_hints(section.default_factory)
        properties = {}
        for f in dataclasses.fields(section.default_factory):
            key = f"{section.name}.{f.name}"
            properties[f.name] = _choice_schema(choices[key]) if key in choices else _field_schema(hints[f.name])
        sections[section.name] = {"type": ["object", "null"], "additionalProperties": False,
                                  "properties": properties}
    return {"type": "object", "additionalProperties": False, "properties": sections,
            "description": "trainer config (trainer/config.py); generated by `make manifests`"}
