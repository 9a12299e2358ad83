"""Job specs: load, check and render.

A job spec is a values file of charts/dat-training (same keys, same defaults), plus `trainerConfigFile`
which datctl reads into `trainer` (relative to the spec's folder; --set trainer.* applies on top). Every user
mistake becomes one line in SpecError.problems.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import posixpath
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes.utils import parse_quantity

from controller import chart, schemas, webhook
from trainer import config as trainer_config
from trainer.yamlfile import describe_yaml_error, load_yaml

OPERATOR_PORT = 23456  # the training operator's pytorchjob-port
RDZV_PORT = 29400  # torchrun's c10d rendezvous port
RESERVED_MOUNTS = ("/etc/dat", "/dev/shm", "/tmp")
HELM_RELEASE_MAX = 53  # helm's limit on a release name
HELM_EXACT_INT = 2**53  # helm reads values as float64: integers beyond this change


@dataclasses.dataclass
class JobSpec:
    values: dict[str, Any]  # as the user wrote it (plus --set), trainerConfigFile read into `trainer`
    trainer_origin: str = "trainer"  # the key trainer-config problems are reported under


class SpecError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _merge(base: Any, override: Any) -> Any:
    """Maps merge key by key, everything else is replaced, and null removes a key (--set trainer.* and -f over
    a trainerConfigFile)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def _overlay(base: Any, override: Any) -> Any:
    """Helm's merge of one values file over another (-f a.yaml -f b.yaml): maps merge key by key, everything
    else, null included, is replaced; the nulls take effect when the chart's defaults come in (_coalesce)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{key: _overlay(base[key], value) if key in base else copy.deepcopy(value)
                           for key, value in override.items()}}
    return copy.deepcopy(override)


def _coalesce(defaults: Any, values: Any) -> Any:
    """Helm's coalescing of the user's values with the chart's defaults: maps merge key by key, a null removes
    the default under its key, and a null with no default under it stays (for the schema to judge, as in
    helm)."""
    if isinstance(defaults, dict) and isinstance(values, dict):
        out = dict(defaults)
        for key, value in values.items():
            if value is None and key in defaults:
                out.pop(key)
            else:
                out[key] = _coalesce(defaults[key], value) if key in defaults else copy.deepcopy(value)
        return out
    return copy.deepcopy(values)


def _helm_scalar(text: str) -> Any:
    """A --set value typed as helm types it: true/false/null, base-10 integers that do not start with 0, else
    the string itself (so image.tag=1.10 stays "1.10" and env.MODE=0755 stays "0755")."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    if text == "0" or (text[:1] != "0" and re.fullmatch(r"[+-]?[0-9]+", text) and -2**63 <= int(text) < 2**63):
        return int(text)
    return text


MAX_SET_INDEX = 65536  # helm's limit on a --set list index


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant)  # NaN and Infinity are not JSON: helm refuses them


def _parse_set(item: str, flag: str = "--set") -> list[tuple[list[str | int], Any]]:
    """helm's --set syntax: a.b=v[,c=v...]; '\\' escapes the next character ('\\.' a dot in a key, '\\,' a comma in
    a value); {x,y} a list; name[i] a list index. --set-string keeps every value a string; --set-json reads each
    value as one JSON document. Hand-written because helm's parser (Go) is not a library here."""
    def fail(why: str) -> SpecError:
        return SpecError([f"{flag} {item}: {why}"])

    scalar = str if flag == "--set-string" else _helm_scalar

    out, i, n = [], 0, len(item)
    while i < n:
        path: list[str | int] = []
        key, after_index = "", False
        while i < n and item[i] not in "=,":
            char = item[i]
            if after_index and char not in ".[":
                raise fail("unexpected data after a list index")
            after_index = False
            if char == "\\":
                key += item[i + 1] if i + 1 < n else ""
                i += 2
                continue
            if char == ".":
                if not key and not (path and isinstance(path[-1], int)):
                    raise fail("a key in the path is empty")
                if key:
                    path.append(key)
                key = ""
            elif char == "[":
                close = item.find("]", i)
                index = item[i + 1:close] if close > 0 else ""
                if not re.fullmatch(r"[0-9]+", index):
                    raise fail(f"list index {index!r} is not a number")
                if int(index) > MAX_SET_INDEX:
                    raise fail(f"list index {index} is larger than the {MAX_SET_INDEX} helm allows")
                if key:
                    path.append(key)
                elif not path:
                    raise fail("a list index needs a key before it")
                path.append(int(index))
                key, after_index, i = "", True, close
            else:
                key += char
            i += 1
        if key:
            path.append(key)
        elif path and not isinstance(path[-1], int):
            raise fail("a key in the path is empty")
        if i >= n or item[i] != "=" or not path:
            if "=[" in item:  # dat-train's list syntax, which the configs' comments show
                raise fail("expected key.path=value; a list is {a,b} in helm's --set (or --set-json 'key=[a,b]')")
            raise fail("expected key.path=value")
        i += 1

        def read_value(stops: str) -> str:  # up to an unescaped stop character; '\\' keeps the next one
            nonlocal i
            text = ""
            while i < n and item[i] not in stops:
                if item[i] == "\\":
                    i += 1
                    if i >= n:
                        break
                text += item[i]
                i += 1
            return text

        if flag == "--set-json":
            while i < n and item[i] in " \t\n\r":
                i += 1
            if i >= n or item[i] == ",":  # key= : null, as in helm
                value = None
            else:
                try:
                    value, i = _STRICT_JSON.raw_decode(item, i)
                except json.JSONDecodeError as exc:
                    raise fail(f"the value is not JSON ({exc.msg} at character {exc.pos + 1})") from None
                except ValueError as exc:
                    raise fail(f"the value is not JSON ({exc})") from None
                while i < n and item[i] in " \t\n\r":
                    i += 1
        elif item[i:i + 1] == "{":  # a list; {} is [""] as in helm
            i += 1
            values = [read_value(",}")]
            while i < n and item[i] == ",":
                i += 1
                values.append(read_value(",}"))
            if i >= n:
                raise fail("a list {...} is not closed")
            i += 1
            value = [scalar(v) for v in values]
        else:
            value = scalar(read_value(","))
        out.append((path, value))
        if i < n and item[i] == ",":
            i += 1
        elif i < n:
            raise fail(f"expected ',' after {'the JSON value' if flag == '--set-json' else 'a list'}")
    return out


def _set_path(spec: dict, item: str, flag: str = "--set") -> None:
    """Apply one --set (--set-string, --set-json) argument, as helm does."""
    for path, value in _parse_set(item, flag):
        node: Any = spec
        for key, nxt in zip(path, path[1:]):
            empty: Any = [] if isinstance(nxt, int) else {}
            if isinstance(key, int):
                node.extend([None] * (key + 1 - len(node)))
            current = node[key] if isinstance(key, int) else node.get(key)
            if isinstance(current, (list, dict)) and not isinstance(current, type(empty)):
                where = ".".join(map(str, path[:path.index(nxt)]))
                raise SpecError([f"{flag} {item}: {where} is a {'list' if isinstance(current, list) else 'map'} "
                                 f"here, not a {'list' if isinstance(empty, list) else 'map'}"])
            if not isinstance(current, type(empty)):
                node[key] = empty
            node = node[key]
        last = path[-1]
        if isinstance(last, int):
            node.extend([None] * (last + 1 - len(node)))
        node[last] = value


def _read_values(path: Path, what: str) -> dict[str, Any]:
    """A values file (the job spec or a -f overlay) as a mapping; every way it can be unreadable is one line."""
    try:
        values = load_yaml(path.read_text())
    except FileNotFoundError:
        raise SpecError([f"{path}: {what} not found"]) from None
    except OSError as exc:  # a folder, no permission
        raise SpecError([f"{path}: cannot read the {what} ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: not a text file"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: {describe_yaml_error(exc)}"]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SpecError([f"{path}: a {what} is a mapping of keys, got {type(values).__name__}"])
    return values


def load_spec(path: str | Path, overrides: list[str] = (), *, values_files: list[str] = (),
              set_json: list[str] = (), set_string: list[str] = ()) -> JobSpec:
    """Read a job spec, apply overrides in helm's order (-f files, --set-json, --set, --set-string) and read
    trainerConfigFile into `trainer`."""
    path = Path(path)
    spec = _read_values(path, "job spec")
    written_trainer = spec.get("trainer")  # what the file says, before the overrides
    for overlay in values_files:
        spec = _overlay(spec, _read_values(Path(overlay), "values file (-f)"))
    for flag, items in (("--set-json", set_json), ("--set", overrides), ("--set-string", set_string)):
        for item in items:
            _set_path(spec, item, flag)
    config_file = spec.get("trainerConfigFile")
    if config_file and isinstance(config_file, str):  # other types: the schema check words it
        if written_trainer:
            raise SpecError(["trainerConfigFile: set either trainer or trainerConfigFile, not both"])
        resolved = (path.parent / config_file).resolve()  # relative to the job spec's folder
        try:
            from_file = load_yaml(resolved.read_text()) or {}
        except FileNotFoundError:
            raise SpecError([f"trainerConfigFile: {config_file}: file not found: {resolved} (a relative path is "
                             "resolved against the job spec's folder)"]) from None
        except OSError as exc:
            raise SpecError([f"trainerConfigFile: {config_file}: cannot read {resolved}: {exc.strerror}"]) from None
        except UnicodeDecodeError:
            raise SpecError([f"trainerConfigFile: {config_file}: {resolved} is not a text file"]) from None
        except yaml.YAMLError as exc:
            raise SpecError([f"trainerConfigFile: {config_file}: {describe_yaml_error(exc)}"]) from None
        if not isinstance(from_file, dict):
            raise SpecError([f"trainerConfigFile: {config_file}: a trainer config is a mapping of sections, "
                             f"got {type(from_file).__name__}"])
        overlay = spec.get("trainer")  # from -f / --set only: they apply on top of the file
        spec["trainer"] = _merge(from_file, overlay) if overlay else from_file
        spec["trainerConfigFile"] = ""
        origin = f"trainerConfigFile {config_file}" + (" with trainer.* overrides" if overlay else "")
        return JobSpec(spec, trainer_origin=origin)
    return JobSpec(spec)


# ---- schema problems, worded for people -------------------------------------------------------------------

def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _trainer_hint(path: str) -> str:
    """For a spec key that is a trainer setting (a trainer config given where the spec was expected)."""
    node: Any = trainer_config.Config().to_dict()
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return f"; a trainer setting: trainer.{path} in the spec, or name a trainer config file in trainerConfigFile"


def _describe(error: jsonschema.ValidationError) -> list[str]:
    where, value = _where(error), error.instance
    kind = error.validator
    if kind == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(value) - set(known))
        prefix = f"{where}." if error.absolute_path else ""
        return [f"{prefix}{key}: unknown key (known: {', '.join(known)}){_trainer_hint(prefix + key)}"
                for key in extra]
    if kind == "required":
        return [f"{where}: {error.message}"]
    if kind == "enum":
        allowed = ", ".join(v if isinstance(v, str) else json.dumps(v) for v in error.validator_value)
        return [f"{where}: {value!r} is not one of {allowed}"]
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [f"{where}: expected {expected}, got {'null' if value is None else repr(value)}"]
    if kind in ("minimum", "maximum"):
        return [f"{where}: must be {'>=' if kind == 'minimum' else '<='} {error.validator_value}, got {value!r}"]
    if kind == "maxLength":
        return [f"{where}: {value!r} is longer than {error.validator_value} characters"]
    description = error.schema.get("description", "")
    if "quantity" in description:
        return [f"{where}: {value!r} is not a valid quantity (e.g. 500m, 2, 16Gi)"]
    if kind in ("pattern", "anyOf", "not") and description:
        return [f"{where}: {value!r} is invalid: {description}"]
    return [f"{where}: {error.message}"]


# An integer is an int: 3.0 passes JSON schema's "integer" but would reach the trainer's checks as a float.
_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, type_checker=(
    jsonschema.Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))))


def _string_keys(node: Any) -> Any:
    """Mapping keys as helm sees them: YAML's `1:` or `true:` keys become the strings "1", "true" in JSON."""
    if isinstance(node, dict):
        return {(k if isinstance(k, str) else json.dumps(k)): _string_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_string_keys(v) for v in node]
    return node


def _schema_errors(spec: dict[str, Any]) -> list[jsonschema.ValidationError]:
    schema = chart.values_schema()
    schema["properties"]["trainer"] = {"type": "object"}  # trainer/config.py words the trainer's problems
    validator = _Validator(schema)
    return sorted(validator.iter_errors(_string_keys(spec)), key=lambda e: list(map(str, e.absolute_path)))


def _helm_trainer_problems(trainer: dict[str, Any]) -> list[str]:
    """What the chart's trainer schema refuses that the trainer itself would take (e.g. epochs: "3", a string),
    so a spec datctl renders is one `helm install` takes too."""
    validator = _Validator({"type": "object", "properties": {"trainer": chart.trainer_schema()}})
    errors = sorted(validator.iter_errors({"trainer": trainer}), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{line} (helm's values schema refuses it)" for error in errors for line in _describe(error)]


def _schema_problems(errors: list[jsonschema.ValidationError]) -> list[str]:
    """values.schema.json problems worded for people, except inside `trainer` (trainer/config.py words those)."""
    problems: dict[str, None] = {}
    for error in errors:
        problems.update(dict.fromkeys(_describe(error)))
    return _collapse_repeats(list(problems), what="items", only=())


def _emptied_keys(defaults: dict[str, Any], values: dict[str, Any]) -> set[str]:
    """The top-level keys under which a null removed one of the chart's defaults: the rules that read them
    do not run (helm renders such a spec as it is)."""
    def missing(base: Any, merged: Any) -> bool:
        if not isinstance(base, dict):
            return False
        if not isinstance(merged, dict):
            return True
        return any(key not in merged or missing(value, merged[key]) for key, value in base.items())

    return {key for key, value in defaults.items() if key != "trainer" and
            (key not in values or missing(value, values[key]))}


def _broken_keys(errors: list[jsonschema.ValidationError]) -> set[str]:
    """The top-level keys whose values break the schema ("" when the spec as a whole does, e.g. not a map).
    An unknown top-level key breaks nothing the rules read."""
    broken = set()
    for error in errors:
        path = list(error.absolute_path)
        if path:
            broken.add(str(path[0]))
        elif error.validator != "additionalProperties":
            broken.add("")
    return broken


# ---- cross-field rules ------------------------------------------------------------------------------------

def nproc_per_node(v: dict[str, Any]) -> int:
    return v["nprocPerNode"] or v["gpusPerNode"] or 1


def longest_pod_name(v: dict[str, Any]) -> str:
    """Must match dat-training.longestPodName in the chart."""
    name = v["name"]
    if v["api"] == "trainjob":
        return f"{name}-node-0-{v['nodes'] - 1}"
    if v["elastic"]["enabled"]:
        return f"{name}-worker-{v['elastic']['maxNodes'] - 1}"
    if v["nodes"] > 1:
        return f"{name}-worker-{v['nodes'] - 2}"
    return f"{name}-master-0"


def _quantity(value: Any) -> Any:
    try:
        return parse_quantity(value) if value is not None else None
    except ArithmeticError:  # NaN, infinity: decimal refuses them
        raise ValueError(f"not a quantity: {value!r}") from None


def _bad_quantities(v: dict[str, Any]) -> list[str]:
    """The quantities the schema's pattern lets through but Kubernetes cannot parse (e.g. 1e1.5)."""
    found = {f"resources.{section}.{key}": value
             for section in ("requests", "limits") for key, value in (v["resources"].get(section) or {}).items()}
    found["shm.sizeLimit"] = v["shm"].get("sizeLimit")
    found["tmp.sizeLimit"] = v["tmp"].get("sizeLimit")
    bad = []
    for where, value in found.items():
        try:
            _quantity(value)
        except ValueError:
            bad.append(f"{where}: {value!r} is not a valid quantity (e.g. 500m, 2, 16Gi)")
    return bad


def _resource_problems(v: dict[str, Any]) -> list[str]:
    bad = _bad_quantities(v)
    if bad:
        return bad
    problems = []
    requests = v["resources"].get("requests") or {}
    limits = v["resources"].get("limits") or {}
    for section, values in (("requests", requests), ("limits", limits)):
        if "nvidia.com/gpu" in values:
            problems.append(f"resources.{section}.nvidia.com/gpu: set GPUs with gpusPerNode, not in resources")
    for key in sorted(set(requests) & set(limits)):
        if _quantity(requests[key]) > _quantity(limits[key]):
            problems.append(f"resources.requests.{key}: {requests[key]} exceeds resources.limits.{key} {limits[key]}")
    memory = limits.get("memory")
    if memory is not None and _quantity(v["shm"]["sizeLimit"]) >= _quantity(memory):
        problems.append(f"shm.sizeLimit: {v['shm']['sizeLimit']} must be below resources.limits.memory {memory} "
                        "(the memory-backed /dev/shm counts against it)")
    return problems


def _data_problems(v: dict[str, Any], trainer: dict[str, Any]) -> list[str]:
    data, source = v["data"], v["data"]["source"]
    tdata = trainer.get("data") if isinstance(trainer.get("data"), dict) else {}
    dataset = tdata.get("name", trainer_config.DataConfig.name)
    problems = []
    if source == "pvc" and not data["claimName"]:
        problems.append("data.claimName: required when data.source is pvc")
    if dataset in ("cifar10", "cifar10-ext") and source == "none":
        problems.append(f"data.source: trainer data.name {dataset} needs a data volume (pvc or download)")
    download = tdata.get("download")
    if source == "pvc" and (download is True or str(download).lower() in ("true", "yes", "on", "1")):
        problems.append("trainer.data.download: the data volume is mounted read-only in the pods, so nothing can "
                        "be fetched into it; use data.source: download (an init container fetches CIFAR-10) or "
                        "put the files on the PVC")
    if dataset == "cifar10-ext" and source == "download":
        problems.append("data.source: download fetches CIFAR-10 only; cifar10-ext needs the TI-500K pickle "
                        "on a PVC (data.source: pvc)")
    ti500k = tdata.get("ti500k_path")
    if dataset == "cifar10-ext" and ti500k:
        inside = posixpath.normpath(str(ti500k)).startswith(data["mountPath"].rstrip("/") + "/")
        if not inside:
            problems.append(f"trainer.data.ti500k_path: {ti500k!r} is not on the data volume "
                            f"(an absolute path under data.mountPath {data['mountPath']})")
    if v["api"] == "trainjob" and source == "download":
        problems.append("data.source: download needs an init container, which api trainjob cannot add; "
                        "use data.source: pvc")
    return problems


def _scheduling_problems(v: dict[str, Any]) -> list[str]:
    problems = []
    nodes, elastic, volcano = v["nodes"], v["elastic"], v["scheduling"]["volcano"]
    if elastic["enabled"]:
        if v["api"] == "trainjob":
            problems.append("elastic.enabled: not supported with api trainjob")
        if not elastic["minNodes"] <= nodes <= elastic["maxNodes"]:
            problems.append(f"elastic: nodes {nodes} is outside minNodes..maxNodes "
                            f"({elastic['minNodes']}..{elastic['maxNodes']})")
    if volcano["enabled"]:
        if v["scheduling"]["kueueQueue"]:
            problems.append("scheduling: kueueQueue and volcano.enabled cannot be combined (pick one scheduler)")
        if v["api"] == "trainjob":
            problems.append("scheduling.volcano.enabled: not supported with api trainjob (use kueueQueue)")
        if volcano["minAvailable"] > nodes:  # the pods the job creates: an elastic job starts with `nodes`
            problems.append(f"scheduling.volcano.minAvailable: {volcano['minAvailable']} exceeds the {nodes} pods the "
                            "job creates (the gang would never be scheduled)")
    return problems


def _mount_problems(v: dict[str, Any]) -> list[str]:
    mounts = {"checkpoint.mountPath": v["checkpoint"]["mountPath"]}
    if v["data"]["source"] != "none":
        mounts["data.mountPath"] = v["data"]["mountPath"]
    for i, mount in enumerate(v.get("extraVolumeMounts") or []):
        mounts[f"extraVolumeMounts[{i}].mountPath"] = mount["mountPath"]
    problems, seen = [], {}
    for key, path in mounts.items():
        path = posixpath.normpath(path)
        clash = next((r for r in RESERVED_MOUNTS if path == r or path.startswith(r + "/") or r.startswith(path + "/")),
                     None)
        if clash or path == "/":
            problems.append(f"{key}: {path} collides with the pod's {clash or '/'} mount")
        elif path in seen:
            problems.append(f"{key}: {path} is also {seen[path]}")
        seen[path] = key
    return problems


def _counts_are_sound(v: dict[str, Any]) -> bool:
    """Whether the node and process counts are well-typed enough to derive the job's world sizes from."""
    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    elastic = v.get("elastic")
    return (count(v.get("nodes"), 1) and count(v.get("gpusPerNode"), 0) and count(v.get("nprocPerNode"), 0)
            and isinstance(elastic, dict) and isinstance(elastic.get("enabled"), bool)
            and (not elastic["enabled"] or (count(elastic.get("minNodes"), 1) and count(elastic.get("maxNodes"), 1))))


def world_sizes(v: dict[str, Any]) -> list[int]:
    """Every world size the job can run at (an elastic job: each node count in its range); [1] when the counts
    are broken themselves (reported on their own), so the trainer's other checks still run."""
    if not _counts_are_sound(v):
        return [1]
    nodes = [v["nodes"]]
    if v["elastic"]["enabled"]:
        nodes = list(range(v["elastic"]["minNodes"], v["elastic"]["maxNodes"] + 1)) or nodes
    return [n * nproc_per_node(v) for n in nodes]


def _trainer_problems(trainer: dict[str, Any], sizes: list[int], origin: str) -> list[str]:
    errors: list[str] = []  # unknown keys and wrong types; the keys that are fine still get checked
    cfg = trainer_config.config_from_dict(trainer, errors=errors)
    found = dict.fromkeys(errors)  # every problem once, in order, over all the world sizes the job can run at
    found.update(dict.fromkeys(trainer_config.problems(cfg, world_size=sizes[0], check_paths=False)))
    for size in sizes[1:]:  # an elastic range: only the world-size rules differ from one size to the next
        found.update(dict.fromkeys(trainer_config.world_size_problems(cfg, size)))
    from trainer.jointspar import model_problems  # imports torch

    found.update(dict.fromkeys(model_problems(cfg)))  # what `dat-train --check` adds: JointSpar's arms
    return [f"{origin}: {problem}" for problem in _collapse_repeats(list(found))]


def _collapse_repeats(problems: list[str], show: int = 3, what: str = "world sizes",
                      only: tuple[str, ...] = ("world size", "rank(s)")) -> list[str]:
    """The same rule failing many times (at many world sizes of an elastic range, or for many list items):
    show a few, then count the rest. `only`: the problems that may repeat (all when empty)."""
    out, seen = [], {}
    for problem in problems:
        if only and not any(word in problem for word in only):
            out.append(problem)
            continue
        shape = re.sub(r"\d+", "N", problem)
        seen[shape] = seen.get(shape, 0) + 1
        if seen[shape] <= show:
            out.append(problem)
    out += [f"... and {n - show} more {what} like: {shape}" for shape, n in seen.items() if n > show]
    return out


def _number_problems(spec: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, problem) for the numbers helm cannot carry: NaN and infinities (its JSON refuses them; the trainer's
    own checks word those under `trainer`) and integers beyond 2^53 (its values are float64, so 2^63 - 1 would
    come out changed). env and nccl values go to helm as strings."""
    if isinstance(spec, dict):
        return [found for key, value in spec.items() if path or key not in ("env", "nccl")
                for found in _number_problems(value, (*path, key))]
    if isinstance(spec, list):
        return [found for i, value in enumerate(spec) for found in _number_problems(value, (*path, i))]
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    if isinstance(spec, float) and not math.isfinite(spec) and path[:1] != ("trainer",):
        return [(path, f"{where}: {spec} is not a finite number")]
    if isinstance(spec, int) and not isinstance(spec, bool) and abs(spec) > HELM_EXACT_INT:
        return [(path, f"{where}: {spec} is larger than 2^53, the largest integer helm's values (float64) hold "
                       "exactly")]
    return []


# Sections a null may remove whole: the templates read their keys only where they exist.
NULLABLE_SECTIONS = ("resources", "nccl")


def _null_section_problems(spec: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """A null section (`nodePool:` with every key commented out) removes all of the chart's defaults under it;
    the templates then fail on a nil map, which helm words as its own internals."""
    return [f"{key}: null removes the chart's whole {key} section, which its templates need; remove the line, or "
            f"null the keys inside it" for key, value in spec.items()
            if value is None and key not in NULLABLE_SECTIONS and key not in DATCTL_READS
            and isinstance(defaults.get(key), dict) and defaults[key]]


def _name_problems(v: dict[str, Any]) -> list[str]:
    if not v["name"]:
        return ["name: required (the job name; pods are <name>-master-0, <name>-worker-<i>)"]
    if len(v["name"]) > HELM_RELEASE_MAX:
        return [f"name: {v['name']!r} has {len(v['name'])} characters; the job name is also the Helm release name, "
                f"which helm limits to {HELM_RELEASE_MAX}"]
    if len(longest_pod_name(v)) > 63:
        return [f"name: {v['name']!r} is too long for {v['nodes']} nodes: pod name "
                f"{longest_pod_name(v)!r} has {len(longest_pod_name(v))} characters (max 63)"]
    return []


def _job_problems(v: dict[str, Any]) -> list[str]:
    if not v["job"]["enabled"]:
        return ["job.enabled: false makes a monitoring-only Helm release (dashboard, alerts, exporter); datctl "
                "submits training runs: `helm install NAME charts/dat-training --set job.enabled=false ...`"]
    return []


def _process_problems(v: dict[str, Any]) -> list[str]:
    if v["gpusPerNode"] > 0 and v["nprocPerNode"] not in (0, v["gpusPerNode"]):
        return [f"nprocPerNode: {v['nprocPerNode']} does not match gpusPerNode {v['gpusPerNode']} "
                "(each torchrun process needs its own GPU)"]
    return []


def _gpu_problems(v: dict[str, Any]) -> list[str]:
    if v["gpusPerNode"] > 0:
        return []
    problems = []
    if v["nodePool"].get("accelerator"):
        problems.append(f"nodePool.accelerator: {v['nodePool']['accelerator']!r} with gpusPerNode 0 would place CPU-only "
                        "pods on GPU nodes without the GPU toleration (they stay Pending); set gpusPerNode or drop it")
    backend = (v["trainer"].get("dist") or {}).get("backend") if isinstance(v["trainer"].get("dist"), dict) else None
    if backend == "nccl":
        problems.append("trainer.dist.backend: nccl needs GPUs and gpusPerNode is 0 (use auto or gloo)")
    return problems


CHART_POD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")


def _label_problems(v: dict[str, Any]) -> list[str]:
    return [f"podLabels.{key}: set by the chart (its selectors and the PodMonitor use it)"
            for key in map(str, v["podLabels"]) if key in CHART_POD_LABELS]


def _port_problems(v: dict[str, Any]) -> list[str]:
    if v["metrics"]["port"] in (OPERATOR_PORT, RDZV_PORT):
        return [f"metrics.port: {v['metrics']['port']} is taken by the operator / torchrun rendezvous"]
    return []


# Each cross-field rule with the top-level keys it reads: it runs when those are well-typed, so a schema
# problem in one part of a spec does not hide the rules about the others (one round of fixes, not two).
CROSS_FIELD_RULES = (
    (_job_problems, ("job",)),
    (_name_problems, ("name", "nodes", "api", "elastic")),
    (_process_problems, ("gpusPerNode", "nprocPerNode")),
    (_port_problems, ("metrics",)),
    (_gpu_problems, ("gpusPerNode", "nodePool", "trainer")),
    (_label_problems, ("podLabels",)),
    (_resource_problems, ("resources", "shm", "tmp")),
    (lambda v: _data_problems(v, v["trainer"]), ("data", "api", "trainer")),
    (_scheduling_problems, ("nodes", "elastic", "scheduling", "api")),
    (_mount_problems, ("checkpoint", "data", "extraVolumeMounts")),
)


# Values datctl itself reads to render and submit (the release name, namespace, kind, trainer config, ...).
DATCTL_READS = ("name", "namespace", "api", "trainer", "checkpoint.claimName", "metrics.podMonitor")


def _fill_nulls(target: dict[str, Any], source: dict[str, Any]) -> None:
    """Each DATCTL_READS value that is null or missing in `target` (under a parent that is there) taken from
    `source`."""
    for path in DATCTL_READS:
        *parents, last = path.split(".")
        node, given = target, source
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
            given = given.get(key) if isinstance(given, dict) else None
        if isinstance(node, dict) and node.get(last) is None and isinstance(given, dict) and last in given:
            node[last] = copy.deepcopy(given[last])


def check(spec: dict[str, Any], origin: str = "trainer") -> dict[str, Any]:
    """The spec merged with the chart defaults; raises SpecError listing every problem found."""
    defaults = chart.chart_values()
    v = _coalesce(defaults, spec)  # checked as helm checks it: merged with the chart's defaults
    _fill_nulls(v, defaults)  # a null there means the chart's default (its templates treat both alike)
    errors = _schema_errors(v)  # validated once: worded for the user, and which keys the rules must skip
    numbers = _number_problems(spec)
    problems = [line for _, line in numbers] + _null_section_problems(spec, defaults) + _schema_problems(errors)
    broken = _broken_keys(errors) | _emptied_keys(defaults, v) | {str(path[0]) for path, _ in numbers}
    if "" not in broken:
        for rule, reads in CROSS_FIELD_RULES:
            if not broken.intersection(reads):
                problems += rule(v)
    if isinstance(v.get("trainer"), dict):  # the trainer's checks need only the node and process counts
        trainer_found = _trainer_problems(v["trainer"], world_sizes(v), origin)
        if origin == "trainer":  # inline: helm validates it too, with stricter types (a key once: the trainer's)
            named = {key for line in trainer_found for key in re.findall(r"\b[a-z_]+\.[a-z_0-9]+\b", line)}
            trainer_found += [line for line in _helm_trainer_problems(v["trainer"])
                              if line.split(":", 1)[0].removeprefix("trainer.") not in named]
        problems += trainer_found
    if problems:
        raise SpecError(problems)
    return v


def normalized_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """The user's trainer keys with the types trainer/config.py gives them (e.g. '1e-3' -> 0.001), so the
    values file datctl hands to helm is typed the way Go reads YAML."""
    cfg = trainer_config.config_from_dict(trainer)
    out: dict[str, Any] = {}
    for section, values in trainer.items():
        if not values:
            continue
        typed = getattr(cfg, section)
        out[section] = {}
        for key in values:
            value = getattr(typed, key)
            out[section][key] = list(value) if isinstance(value, tuple) else value
    return out


# Trainer settings the chart sets from the job spec (dat-training.trainerConfig), and why.
CHART_OWNED_TRAINER_SETTINGS = {
    ("run", "output_dir"): "on the checkpoint volume, checkpoint.mountPath/name, so a restarted pod resumes",
    ("metrics", "port"): "the job spec's metrics.port, which the pods and the PodMonitor use; set metrics.port instead",
    ("metrics", "job_name"): "the job's name, which the alerts and dashboard match the job's metrics with",
    ("data", "root"): "the data volume, data.mountPath",
}


# PyTorchJob settings a TrainJob has no place for: its TrainingRuntime sets them.
TRAINJOB_IGNORED = ("restartPolicy", "runPolicy.backoffLimit", "runPolicy.cleanPodPolicy",
                    "runPolicy.ttlSecondsAfterFinished", "scheduling.priorityClassName", "image.pullPolicy",
                    "runtimeClassName", "nodePool.topologySpreadConstraints")


def render_warnings(v: dict[str, Any], given: dict[str, Any], rendered: dict[str, Any], origin: str) -> list[str]:
    """One line for each user-given trainer setting (`given`, typed by normalized_trainer) that the chart
    replaced in the config it rendered (`rendered`), and for checkpoints on an emptyDir."""
    out = []
    for (section, key), why in CHART_OWNED_TRAINER_SETTINGS.items():
        mine, theirs = (given.get(section) or {}).get(key), (rendered.get(section) or {}).get(key)
        if mine is None or theirs is None:
            continue
        same = posixpath.normpath(mine) == posixpath.normpath(theirs) if isinstance(theirs, str) else mine == theirs
        if not same:
            out.append(f"{origin}: {section}.{key} {mine!r} is replaced by {theirs!r} ({why})")
    if v["api"] == "trainjob":
        defaults = chart.chart_values()
        for path in TRAINJOB_IGNORED:
            mine, default = v, defaults
            for key in path.split("."):
                mine, default = (mine or {}).get(key), (default or {}).get(key)
            if mine is not None and mine != default:
                out.append(f"{path}: {mine!r} is not applied with api trainjob (its TrainingRuntime decides it)")
    repository = str(v["image"]["repository"])
    if "/" not in repository and v["image"]["pullPolicy"] != "Never":  # e2e-kind loads the image: Never
        out.append(f"image.repository: {repository!r} names no registry, so nodes pull docker.io/library/{repository}, "
                   "which is not this project's image; push `make image` to your registry and set image.repository")
    if (v.get("exporter") or {}).get("enabled"):
        out.append("exporter.enabled: datctl submits the run's own objects, not the exporter; it comes with "
                   "`helm install NAME charts/dat-training -f SPEC`")
    if v["api"] == "pytorchjob" and v["restartPolicy"] == "ExitCode" and not v["runPolicy"]["activeDeadlineSeconds"]:
        out.append("restartPolicy ExitCode restarts a pod that exited 128 or above (SIGTERM, a lost peer, an OOM "
                   "kill) without limit, as the operator counts none of them against backoffLimit; set "
                   "runPolicy.activeDeadlineSeconds to bound the job")
    if not v["checkpoint"]["claimName"]:
        out.append("checkpoint.claimName is empty: checkpoints go to an emptyDir and are lost with the pod "
                   "(a rescheduled or deleted pod starts over); set checkpoint.claimName to a PVC to keep them")
    return out


@dataclasses.dataclass
class Rendered:
    values: dict[str, Any]  # the spec merged with the chart defaults
    namespace: str
    # ConfigMap, (TrainJob) ServiceAccount, NetworkPolicy when enabled, the job, PodMonitor when monitoring is on
    objects: list[dict[str, Any]]
    warnings: list[str] = dataclasses.field(default_factory=list)  # not errors: one line each, for stderr
    helm_values: dict[str, Any] = dataclasses.field(default_factory=dict)  # what helm got: the trainer config inline

    @property
    def job(self) -> dict[str, Any]:
        return next(o for o in self.objects if o["kind"] in ("PyTorchJob", "TrainJob"))


def _env_text(value: Any) -> Any:
    """An env value as helm's chart prints it (dat-training.envValue): bools as true/false, whole numbers as
    integers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 9.0e18:  # the chart's bound
        return str(int(value))
    return str(value) if isinstance(value, (int, float)) else value


def render(job: JobSpec, namespace: str | None = None, api: str | None = None,
           monitoring_api: bool = True) -> Rendered:
    """Check a loaded spec and render it with the chart (as `helm template` would for the same values)."""
    spec = copy.deepcopy(job.values)
    if api:
        spec["api"] = api
    values = check(spec, job.trainer_origin)
    _fill_nulls(spec, values)  # helm gets the default check() put in place of a null
    spec["trainer"] = normalized_trainer(values["trainer"])
    for section in ("env", "nccl"):  # as strings: helm reads numbers as float64 (12345678901234567 would change)
        if isinstance(spec.get(section), dict):
            spec[section] = {key: _env_text(value) for key, value in spec[section].items()}
    namespace = values["namespace"] or namespace or "default"
    if len(namespace) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace):
        raise SpecError([f"-n {namespace}: not a namespace name (lower-case letters, digits and '-', at most 63)"])
    rendered = chart.helm_template(spec, release=values["name"], namespace=namespace,
                                   api_versions=(chart.MONITORING_API,) if monitoring_api else ())
    order = {"ConfigMap": 0, "ServiceAccount": 0, "NetworkPolicy": 0, "PyTorchJob": 1, "TrainJob": 1, "PodMonitor": 2}
    objects = sorted(chart.run_objects(rendered), key=lambda o: order.get(o["kind"], 3))
    for obj in objects:  # datctl, not a Helm release, applies these: say so (Helm would adopt them otherwise)
        set_manager_label(obj, "datctl")
    config = yaml.safe_load(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["config.yaml"])
    warnings = render_warnings(values, spec["trainer"], config, job.trainer_origin)
    warnings += [f"{job.trainer_origin}: {note}" for note in trainer_config.ineffective_settings(
        trainer_config.config_from_dict(config))]
    result = Rendered(values=values, namespace=namespace, objects=objects, warnings=warnings, helm_values=spec)
    result.warnings += _crd_problems(result.job, values)
    if result.job["kind"] == "PyTorchJob":
        broken = webhook.check_pytorchjob(result.job)
        if broken:  # the chart broke an operator rule: a bug in the chart, not a user mistake
            raise chart.ChartError(f"the chart rendered a PyTorchJob the operator would refuse: {'; '.join(broken)}")
    return result


# The spec's free-form sections (passed through to the pod spec unchecked by the chart's schema) and where their
# content lands in the rendered pods: a CRD problem there is the user's mistake.
FREE_FORM_SECTIONS = (("nodePool.affinity", ".affinity"), ("nodePool.tolerations", ".tolerations"),
                      ("nodePool.topologySpreadConstraints", ".topologySpreadConstraints"),
                      ("extraVolumes", ".volumes."), ("extraVolumeMounts", ".volumeMounts."), ("extraEnv", ".env."))


def _crd_problems(job: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The job against its CRD's schema, where the schema is at hand (schemas.schema_dir()): catches what the
    chart passes through unchecked, e.g. a typo inside nodePool.affinity or an extraVolumes entry (which the
    API server would drop, leaving e.g. a volume with no source: an emptyDir). An error where it comes from
    the spec's free-form sections, else a warning (the chart's own output: a chart bug or a newer CRD)."""
    try:
        found = schemas.crd_problems(job)
    except schemas.SchemaMissing:
        return []
    errors = []
    for key, fragment in FREE_FORM_SECTIONS:
        section, *rest = key.split(".")
        value = values.get(section)
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        if value:
            lines = [re.sub(r"pytorchReplicaSpecs\.\w+\.", "pytorchReplicaSpecs.*.", line) for line in found
                     if fragment in line]  # the same problem in the Master's and the Workers' pods: once
            errors += [f"{key}: the {job['kind']} CRD refuses it: {line}" for line in dict.fromkeys(lines)]
    if errors:
        raise SpecError(errors)
    return [f"the rendered {job['kind']} breaks its CRD schema: {line}" for line in found]


MANAGED_BY = "app.kubernetes.io/managed-by"


def set_manager_label(node: Any, manager: str) -> None:
    """Set every app.kubernetes.io/managed-by label the chart rendered (objects, pod templates, selectors)."""
    if isinstance(node, dict):
        if isinstance(node.get(MANAGED_BY), str):
            node[MANAGED_BY] = manager
        for value in node.values():
            set_manager_label(value, manager)
    elif isinstance(node, list):
        for value in node:
            set_manager_label(value, manager)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as literal blocks."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
