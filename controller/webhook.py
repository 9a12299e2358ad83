"""The training operator v1.9 admission rules for a PyTorchJob, plus the mistakes that only show up after
pods sit pending on expensive nodes (no /dev/shm, GPUs not matching processes per node).

Checked on datctl's own output and on any manifest by `datctl validate`; each problem is one line.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

from kubernetes import client

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
REPLICA_TYPES = ("Master", "Worker")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")  # the CRD's schema leaves it a free string
CONTAINER = "pytorch"


_api_client = client.ApiClient()


def _quantities_as_strings(template: dict[str, Any]) -> dict[str, Any]:
    """The API accepts numbers for quantities (int-or-string); the client's models take strings only."""
    template = copy.deepcopy(template)
    spec = template.get("spec") or {}
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for section in ("requests", "limits"):
            values = (container.get("resources") or {}).get(section)
            if isinstance(values, dict):
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        values[key] = str(value)
    for volume in spec.get("volumes") or []:
        empty_dir = volume.get("emptyDir")
        if isinstance(empty_dir, dict) and isinstance(empty_dir.get("sizeLimit"), (int, float)):
            empty_dir["sizeLimit"] = str(empty_dir["sizeLimit"])
    return template


def pod_template(obj: dict[str, Any]) -> client.V1PodTemplateSpec:
    """A pod template as the kubernetes client's (pydantic) model: wrong types and unknown fields raise
    ValueError, without needing the CRD schema."""
    return _api_client.deserialize(json.dumps(_quantities_as_strings(obj)), "V1PodTemplateSpec",
                                   "application/json")


def _one_line(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic.ValidationError
        title = getattr(exc, "title", "")
        return "; ".join(f"{title} {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
    return " ".join(str(exc).split())


def _pod_problems(where: str, template: dict[str, Any] | None, nproc: str | None) -> list[str]:
    pod_spec = (template or {}).get("spec") if isinstance(template, dict) else None
    for key in ("containers", "initContainers", "volumes"):  # the model's own message for these is obscure
        value = pod_spec.get(key) if isinstance(pod_spec, dict) else None
        if value is not None and not isinstance(value, list):
            return [f"{where}.template.spec.{key}: must be a list, got {type(value).__name__}"]
    try:
        tmpl = pod_template(template or {})
    except (ValueError, TypeError, AttributeError) as exc:  # the model refuses the structure
        return [f"{where}.template: not a valid pod template: {_one_line(exc)}"]
    containers = tmpl.spec.containers if tmpl.spec else None
    if not containers:
        return [f"{where}.template.spec.containers: must be specified"]
    problems = [f"{where}.template.spec.containers[{i}].image: required"
                for i, c in enumerate(containers) if not c.image]
    main = next((c for c in containers if c.name == CONTAINER), None)
    if main is None:
        names = ", ".join(c.name for c in containers)
        return problems + [f"{where}.template.spec.containers: needs a container named {CONTAINER!r} (found: {names})"]
    shm_volumes = {v.name for v in tmpl.spec.volumes or [] if v.empty_dir and v.empty_dir.medium == "Memory"}
    if not any(m.mount_path == "/dev/shm" and m.name in shm_volumes for m in main.volume_mounts or []):
        problems.append(f"{where}: container {CONTAINER} has no memory-backed /dev/shm (the 64Mi default "
                        "breaks NCCL and DataLoader workers)")
    gpus = (main.resources.limits or {}).get("nvidia.com/gpu") if main.resources else None
    if str(gpus).isdigit() and nproc is not None and nproc.isdigit() and int(str(gpus)) != int(nproc):
        problems.append(f"{where}: {gpus} GPU(s) per pod but spec.nprocPerNode is {nproc} "
                        "(one torchrun process per GPU)")
    return problems


def _not_mapping(value: Any) -> bool:
    return value is not None and not isinstance(value, dict)


def _shape_problems(job: dict[str, Any]) -> list[str]:
    """The nesting the rules below walk: mappings where mappings belong."""
    problems = [f"{key}: must be a mapping" for key in ("metadata", "spec") if _not_mapping(job.get(key))]
    if problems:
        return problems
    name = (job.get("metadata") or {}).get("name")
    if not isinstance(name, str):
        problems.append(f"metadata.name: must be a string, got {name!r}")
    spec = job.get("spec") or {}
    problems += [f"spec.{key}: must be a mapping" for key in ("pytorchReplicaSpecs", "elasticPolicy")
                 if _not_mapping(spec.get(key))]
    if problems:
        return problems
    for rtype, rspec in (spec.get("pytorchReplicaSpecs") or {}).items():
        if _not_mapping(rspec) or _not_mapping((rspec or {}).get("template")):
            problems.append(f"spec.pytorchReplicaSpecs.{rtype}: must be a mapping with a template mapping")
    return problems


def check_pytorchjob(job: dict[str, Any]) -> list[str]:
    """Problems with a kubeflow.org/v1 PyTorchJob, each as one line."""
    problems = _shape_problems(job)
    if problems:
        return problems
    name = (job.get("metadata") or {}).get("name")
    spec = job.get("spec") or {}
    if not DNS1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label (lower-case letters, digits and '-', "
                        "starting with a letter, at most 63 characters)")
    replicas = spec.get("pytorchReplicaSpecs")
    if not replicas:
        return problems + ["spec.pytorchReplicaSpecs: must be specified"]
    elastic = spec.get("elasticPolicy")
    if elastic is not None and elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        problems.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    if elastic is not None and "Worker" not in replicas:
        problems.append("spec.pytorchReplicaSpecs.Worker: must be configured if elastic policy is used")
    if elastic is None and "Master" not in replicas:
        problems.append("spec.pytorchReplicaSpecs.Master: required (exactly one Master hosts the rendezvous)")
    nproc = spec.get("nprocPerNode")
    nproc = str(nproc) if nproc is not None else None
    pod_names = []  # the operator names a pod and its headless Service <job>-<type>-<index>
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in REPLICA_TYPES:
            problems.append(f"{where}: unknown replica type (supported: {', '.join(REPLICA_TYPES)})")
            continue
        rspec = rspec or {}
        count = rspec.get("replicas", 1)
        if not isinstance(count, int) or isinstance(count, bool):
            problems.append(f"{where}.replicas: must be an integer, got {count!r}")
            continue
        policy = rspec.get("restartPolicy")
        if policy is not None and policy not in RESTART_POLICIES:
            problems.append(f"{where}.restartPolicy: {policy!r} is not one of {', '.join(RESTART_POLICIES)} (the "
                            "operator would run the pods with no restart policy it knows)")
        if rtype == "Master" and count != 1:
            problems.append(f"{where}.replicas: must be 1, got {count}")
        if rtype == "Worker" and count < 1:
            problems.append(f"{where}.replicas: must be at least 1, got {count}")
        if rtype == "Worker" and elastic is not None:
            most = elastic.get("maxReplicas")
            if most is not None and (not isinstance(most, int) or isinstance(most, bool)):
                problems.append(f"spec.elasticPolicy.maxReplicas: must be an integer, got {most!r}")
                most = None
            count = max(count, most or 0)  # the operator may scale up to maxReplicas
        pod_names.append(f"{name}-{rtype.lower()}-{max(count - 1, 0)}")
        problems += _pod_problems(where, rspec.get("template"), nproc)
    longest = max(pod_names, key=len, default="")
    if DNS1035.match(name) and len(longest) > 63:
        problems.append(f"metadata.name: pod name {longest!r} has {len(longest)} characters (max 63); "
                        "shorten the name")
    return problems
