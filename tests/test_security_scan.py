"""checkov, the IaC scanner a platform team runs in CI, finds nothing on what this repository deploys: the chart
rendered with `helm template` for its default values (with and without the exporter) and every ci/ values file,
the committed manifests/, and the Dockerfile.

Skips are documented where they apply: .checkov.yaml (project-wide, one reason per check), `checkov.io/skipN`
annotations on the objects they concern (chart templates), `# checkov:skip=` comments in the Dockerfile.

checkov knows the core kinds only, not the PyTorchJob and TrainJob that create the trainer pods. So their pod
templates are scanned as Pods too (a TrainJob's with the trainer's image, command, env and resources merged into
its container, as Kubeflow Trainer does), and each is checked to have been scanned.

checkov runs from its own venv (`make checkov`, pinned in the Makefile; `make test` installs it), offline."""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from controller import chart

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dat-training"
CONFIG = ROOT / ".checkov.yaml"
CHECKOV = Path(os.environ.get("DAT_CHECKOV") or ROOT / "tools" / "checkov-venv" / "bin" / "checkov")
PINNED = re.search(r"^CHECKOV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)

# What gets scanned: case name -> helm template arguments (chart cases) or a manifest file.
CHART_CASES = {"chart-defaults": [], "chart-defaults-exporter": ["--set", "exporter.enabled=true"],
               "chart-networkpolicy": ["--set", "networkPolicy.enabled=true", "--set", "data.source=download",
                                       "--set", "exporter.enabled=true"]} | {
    f"chart-ci-{p.stem}": ["-f", str(p)] for p in sorted((CHART / "ci").glob("*.yaml"))}
MANIFESTS = {f"{'rbac' if p.parent.name == 'rbac' else 'manifests'}-{p.stem}": p
             for p in sorted((ROOT / "manifests").rglob("*.yaml"))
             if any(d and "kind" in d for d in yaml.safe_load_all(p.read_text()))}  # specs/ are values files

pytestmark = pytest.mark.skipif(not CHECKOV.is_file(),
                                reason=f"checkov not installed at {CHECKOV}: `make checkov` installs it "
                                       "(`make test` does), or set DAT_CHECKOV")


def run_checkov(*args: str) -> dict:
    """One checkov run, its JSON report (one framework). --quiet would leave out the passed checks."""
    proc = subprocess.run([str(CHECKOV), "--config-file", str(CONFIG), "--compact", "-o", "json", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), f"checkov failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    assert isinstance(report, dict) and "results" in report, proc.stdout[:2000]
    assert report["summary"]["parsing_errors"] == 0, report["results"]["parsing_errors"]
    return report


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(replica, pod template) of a PyTorchJob or TrainJob; a TrainJob's as its trainer container will run."""
    if obj["kind"] == "PyTorchJob":
        return [(replica.lower(), spec["template"]) for replica, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    if obj["kind"] == "TrainJob":
        trainer = obj["spec"]["trainer"]
        out = []
        for patch in obj["spec"].get("runtimePatches", []):
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                template = job["template"]["spec"]["template"]
                container = template["spec"]["containers"][0]
                container.update({"image": trainer["image"], "command": trainer["command"],
                                  "env": trainer.get("env", []) + container.get("env", []),
                                  "resources": trainer["resourcesPerNode"]})
                out.append((job["name"], template))
        return out
    return []


def with_pods(objects: list[dict]) -> list[dict]:
    """The objects plus a Pod for each pod template of a custom resource checkov cannot read."""
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {**template.get("metadata", {}), "name": f"{obj['metadata']['name']}-{replica}",
                          "namespace": obj["metadata"].get("namespace", "default")},
             "spec": template["spec"]}
            for obj in objects for replica, template in pod_templates(obj)]
    return objects + pods


@dataclass
class Scanned:
    source: str  # the file as a reader finds it in the repository
    pods: list[str] = field(default_factory=list)  # checkov resource ids of the Pods made from pod templates


@dataclass
class Scan:
    report: dict
    scanned: dict[str, Scanned]  # scanned file (as checkov names it) -> what it holds

    def results(self, case: str, kind: str) -> list[dict]:
        return [c for c in self.report["results"][f"{kind}_checks"] if c["file_path"].startswith(f"/{case}/")]


@pytest.fixture(scope="module")
def k8s_scan(tmp_path_factory: pytest.TempPathFactory) -> Scan:
    """One checkov run over everything: <case>/<template or manifest>.yaml."""
    root = tmp_path_factory.mktemp("checkov")
    scanned: dict[str, Scanned] = {}

    def write(case: str, name: str, source: str, objects: list[dict]) -> None:
        objects = with_pods(objects)
        (root / case).mkdir(exist_ok=True)
        (root / case / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))
        scanned[f"/{case}/{name}"] = Scanned(source, [f"Pod.{o['metadata'].get('namespace', 'default')}.{o['metadata']['name']}"
                                                      for o in objects if o["kind"] == "Pod"])

    for case, args in CHART_CASES.items():
        proc = subprocess.run([chart.helm_binary(), "template", "run", str(CHART), *args],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        by_template: dict[str, list[dict]] = {}
        for template, obj in chart.parse_rendered(proc.stdout):
            by_template.setdefault(template, []).append(obj)
        values = f" with {Path(args[1]).relative_to(CHART)}" if args[:1] == ["-f"] else " ".join([""] + args)
        for template, objects in by_template.items():
            write(case, template, f"charts/dat-training/templates/{template}{values}", objects)
    for case, path in MANIFESTS.items():
        write(case, path.name, str(path.relative_to(ROOT)), [d for d in yaml.safe_load_all(path.read_text()) if d])
    return Scan(run_checkov("-d", str(root), "--framework", "kubernetes"), scanned)


def describe(check: dict, scanned: dict[str, Scanned]) -> str:
    lines = "-".join(map(str, check.get("file_line_range") or []))
    source = scanned[check["file_path"]].source if check["file_path"] in scanned else check["file_path"]
    return f"{check['check_id']} {check['check_name']}: {check['resource']} in {source} (scanned lines {lines})"


@pytest.mark.parametrize("case", [*CHART_CASES, *MANIFESTS])
def test_kubernetes_objects_pass_checkov(case: str, k8s_scan: Scan) -> None:
    failed = k8s_scan.results(case, "failed")
    if failed:
        pytest.fail(f"checkov: {len(failed)} failed check(s)\n" + "\n".join(describe(c, k8s_scan.scanned)
                                                                             for c in failed), pytrace=False)
    passed = k8s_scan.results(case, "passed")
    assert passed, f"checkov scanned nothing of {case}"
    if case.startswith("rbac-") or case == "chart-ci-monitoring-values":
        return  # Roles: no pods; the monitoring release: the exporter's Deployment alone (scanned as one)
    # the trainer pods were really checked, not silently left out inside their custom resources
    pods = [pod for path, s in k8s_scan.scanned.items() if path.startswith(f"/{case}/") for pod in s.pods]
    assert pods, f"{case}: no trainer pod found to scan"
    checked = {c["resource"] for c in passed}
    assert not [pod for pod in pods if pod not in checked], f"checkov did not scan {pods} ({sorted(checked)})"


def test_every_skip_has_a_reason(k8s_scan: Scan) -> None:
    """Annotation skips name the check and say why (checkov reports 'No comment provided' otherwise)."""
    skipped = k8s_scan.report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} >= {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_11", "CKV_K8S_38"}
    vague = [describe(c, k8s_scan.scanned) for c in skipped
             if len((c["check_result"].get("suppress_comment") or "").split()) < 4
             or c["check_result"]["suppress_comment"] == "No comment provided"]
    assert not vague, "skips without a reason:\n" + "\n".join(vague)
    for line in CONFIG.read_text().splitlines():
        if re.match(r"\s*-\s*CKV", line):
            assert re.search(r"#\s*\S.{20,}", line), f".checkov.yaml: give the reason for the skip: {line.strip()}"


def test_dockerfile_passes_checkov() -> None:
    report = run_checkov("-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    results = report["results"]
    if results["failed_checks"]:
        pytest.fail("checkov on the Dockerfile:\n" + "\n".join(
            f"{c['check_id']} {c['check_name']}: Dockerfile (lines {'-'.join(map(str, c['file_line_range']))})"
            for c in results["failed_checks"]), pytrace=False)
    assert len(results["passed_checks"]) >= 20
    for check in results["skipped_checks"]:
        assert len((check["check_result"].get("suppress_comment") or "").split()) >= 4, check["check_id"]


def test_checkov_is_the_pinned_version() -> None:
    proc = subprocess.run([str(CHECKOV), "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == PINNED, f"checkov {proc.stdout.strip()} at {CHECKOV}, Makefile pins {PINNED}: " \
                                          "run `make checkov`"
