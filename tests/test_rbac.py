"""manifests/rbac/datctl-user.yaml, the Role a datctl user needs, against the API calls datctl makes in its
recorded conversations (tests/recorded/): every call allowed, and nothing granted that no call uses."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "manifests" / "rbac" / "datctl-user.yaml"
RECORDED = sorted((Path(__file__).resolve().parent / "recorded").glob("*.json"))
# /api/v1/namespaces/NS/RESOURCE[/NAME[/SUBRESOURCE...]] or /apis/GROUP/VERSION/namespaces/NS/...
NAMESPACED = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/(?P<resource>[^/]+)"
                        r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?")
VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def permission(method: str, path: str, query: dict) -> tuple[str, str, str] | None:
    """(api group, resource[/subresource], verb) an API call needs; None for discovery (any user may)."""
    match = NAMESPACED.match(path)
    if not match:
        assert method == "GET" and path.startswith("/apis/") and "namespaces" not in path, path
        return None
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    if method == "GET":
        verb = "get" if match["name"] else ("watch" if query.get("watch") == "true" else "list")
    else:
        verb = VERBS[method]
    return match["group"] or "", resource, verb


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def recorded_calls() -> set[tuple[str, str, str]]:
    calls = set()
    for scenario in RECORDED:
        for exchange in json.loads(scenario.read_text())["exchanges"]:
            request = exchange["request"]
            needed = permission(request["method"], request["path"], request.get("query") or {})
            if needed:
                calls.add(needed)
    return calls


def test_the_role_is_a_valid_least_privilege_role() -> None:
    import kubernetes_validate
    (role,) = [d for d in yaml.safe_load_all(ROLE.read_text()) if d]
    kubernetes_validate.validate(role, "1.33", strict=True)
    assert role["kind"] == "Role"  # namespaced: never a ClusterRole
    assert not any("*" in rule[key] for rule in role["rules"] for key in ("apiGroups", "resources", "verbs"))
    assert not {"secrets", "pods/exec", "pods/attach", "roles", "rolebindings"} & {
        r for rule in role["rules"] for r in rule["resources"]}


def test_every_recorded_datctl_call_is_allowed_by_the_role() -> None:
    (role,) = [d for d in yaml.safe_load_all(ROLE.read_text()) if d]
    calls = recorded_calls()
    assert len(calls) >= 15, calls  # the conversations cover submit, status, watch, logs, delete
    assert calls - granted(role) == set()


def test_the_role_grants_only_what_datctl_uses() -> None:
    """Each grant is used by a recorded call, or is the rollback / delete / other-api twin of one."""
    (role,) = [d for d in yaml.safe_load_all(ROLE.read_text()) if d]
    twins = {("trainer.kubeflow.org", "trainjobs", "delete")}  # delete --api trainjob
    assert granted(role) - recorded_calls() - twins == set()


@pytest.mark.parametrize("method,path,query,expected", [
    ("GET", "/api/v1/namespaces/a/pods", {}, ("", "pods", "list")),
    ("GET", "/api/v1/namespaces/a/pods/p-0:9400/proxy/metrics", {}, ("", "pods/proxy", "get")),
    ("POST", "/apis/kubeflow.org/v1/namespaces/a/pytorchjobs", {"dryRun": "All"}, ("kubeflow.org", "pytorchjobs", "create")),
    ("GET", "/apis/kubeflow.org/v1/namespaces/a/pytorchjobs", {"watch": "true"}, ("kubeflow.org", "pytorchjobs", "watch")),
    ("GET", "/apis/monitoring.coreos.com/v1", {}, None),
])
def test_calls_map_to_the_permissions_the_api_server_checks(method: str, path: str, query: dict,
                                                           expected: tuple | None) -> None:
    assert permission(method, path, query) == expected
