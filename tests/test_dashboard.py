"""The Grafana dashboard: portable (a datasource variable, no __inputs), the panels the issue asks for, every
metric it queries is one our exporters expose, and the chart ships it as a sidecar-labelled ConfigMap.
(That every query parses and returns data is checked against a real Prometheus in test_prometheus_e2e.py.)"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from controller.exporter import EXPORTED, JobCollector, JobStore, WatchStats
from trainer.config import MetricsConfig
from trainer.observability import TrainingExporter

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dat-training"
DASHBOARD_FILE = CHART / "files" / "dat-training-dashboard.json"
RECORDED = Path(__file__).resolve().parent / "recorded_watch"
DS = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def test_dashboard_is_portable(dashboard):
    text = DASHBOARD_FILE.read_text()
    assert "__inputs" not in dashboard and "${DS_" not in text and "DS_PROMETHEUS" not in text
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, label in (("namespace", "namespace"), ("job", "job_name"), ("rank", "rank")):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DS
        query = var["query"]["query"]
        if query.startswith("query_result("):  # the trainer's and datctl exporter's jobs: a regex picks the label
            assert var["regex"] == f'/{label}="([^"]+)"/', var
        else:
            assert re.fullmatch(rf"label_values\(dat_\w+(\{{.*\}})?, {label}\)", query), var["query"]
        assert var["includeAll"] and var["allValue"] == ".*"
    # a job that never served trainer metrics (pending, failed early) is still one to pick
    assert "dat_job_condition" in variables["job"]["query"]["query"]
    for name in ("namespace", "job"):  # over the dashboard's time range, like label_values: finished jobs too
        assert variables[name]["query"]["query"].count("last_over_time(") == 2
    for panel in panels(dashboard):  # same-named jobs of two namespaces stay apart in every legend
        for target in panel["targets"]:
            legend = target.get("legendFormat", "")
            assert not legend or re.match(r"\{\{(job_)?namespace\}\}/\{\{job_name\}\}", legend), (panel["title"], legend)
    for panel in panels(dashboard):
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, panel["title"]
    assert dashboard["uid"] == "dat-training"


def test_panels_and_layout(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    by_title = {p["title"]: p for p in panels(dashboard)}

    def query(title: str) -> str:
        return " ".join(t["expr"] for t in by_title[title]["targets"])

    assert "dat_epoch_duration_seconds" in query("Epoch duration per job")
    phases = by_title["Epoch phase breakdown"]
    assert phases["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert 'phase=~"data|attack|compute|communication|optimizer|checkpoint"' in query("Epoch phase breakdown")
    assert 'phase="communication"' in query("Communication share of training time")
    assert "dat_epoch_train_duration_seconds" in query("Communication share of training time")
    assert "dat_epoch_progress_ratio" in query("Training progress")
    bytes_query = query("Gradient bytes per epoch: sent vs dense")
    assert "dat_epoch_communication_bytes" in bytes_query and "dat_epoch_dense_communication_bytes" in bytes_query
    assert "dat_images_per_second" in query("Images per second")
    accuracy = query("Clean (CA) and robust (RA) test accuracy")
    assert "dat_test_clean_accuracy" in accuracy and "dat_test_robust_accuracy" in accuracy
    assert "dat_jointspar_active_fraction" in query("JointSpar active fraction")
    assert "dat_job_condition" in query("Job states")
    for expr in exprs(dashboard):
        assert ('namespace=~"$namespace"' in expr) or ('job_namespace=~"$namespace"' in expr), expr
        # one line per job, never two jobs merged: same-named jobs of two namespaces included
        assert re.search(r"\b(max|avg|sum) by \((job_)?namespace, job_name\b", expr), expr
        # rank 0 alone exports the job's values: a rank filter would empty these panels
        if re.search(JOB_WIDE, expr):
            assert "$rank" not in expr, expr


JOB_WIDE = (r"\bdat_(epoch|epoch_progress_ratio|images_per_second|train_loss|train_\w+_accuracy|test_\w+_accuracy|"
            r"learning_rate|jointspar_\w+|run_info)\b")


def exposed_metric_names(tmp_path: Path) -> set[str]:
    """Sample names the trainer's and the controller's exporters actually serve."""
    trainer = TrainingExporter.start(MetricsConfig(pushgateway="127.0.0.1:9"), rank=0, local_rank=0, node_rank=0,
                                     world_size=1, local_world_size=1, default_job_name="x",
                                     run_info={"model": "m", "attack": "a", "optimizer": "o", "loss": "l",
                                               "jointspar": "on", "world_size": "1"})
    trainer.pushgateway = ""
    record = {k: 1.0 for k in ("epoch", "epoch_seconds", "data_seconds", "attack_seconds", "compute_seconds",
                               "comm_seconds", "optimizer_seconds", "eval_seconds", "comm_bytes", "dense_comm_bytes",
                               "comm_calls", "images", "images_per_second", "train_loss", "train_clean_acc",
                               "train_adv_acc", "test_clean_acc", "test_robust_acc", "lr", "jointspar_active_arms",
                               "jointspar_active_fraction")}
    trainer.observe_epoch(record)
    watched = []
    for api, recording in (("pytorchjob", "list-3.json"), ("trainjob", "trainjob-list.json")):
        store = JobStore(EXPORTED[api])
        store.replace(json.loads((RECORDED / recording).read_text())["items"])
        watched.append((store, WatchStats()))
    registry = CollectorRegistry()
    registry.register(JobCollector(watched))
    text = generate_latest(trainer.registry).decode() + generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_queried_metric_is_exposed(dashboard, tmp_path):
    exposed = exposed_metric_names(tmp_path)
    queried = {name for expr in exprs(dashboard) for name in re.findall(r"\bdat_[a-z_]+\b", expr)}
    queried |= {name for v in dashboard["templating"]["list"] if v["type"] == "query"
                for name in re.findall(r"\bdat_[a-z_]+\b", v["query"]["query"])}
    assert len(queried) >= 15
    assert queried <= exposed, f"queried but never exposed: {sorted(queried - exposed)}"


def helm_template(*args: str, show_only: bool = True) -> subprocess.CompletedProcess:
    helm = shutil.which("helm") or (str(ROOT / "bin" / "helm") if (ROOT / "bin" / "helm").exists() else None)
    if helm is None:
        pytest.fail("helm is not installed: run `make tools`")
    only = ["--show-only", "templates/grafana-dashboard.yaml"] if show_only else []
    return subprocess.run([helm, "template", "run-1", str(CHART), "--namespace", "team-a", *only, *args],
                          capture_output=True, text=True, timeout=120)


def test_chart_ships_the_dashboard_as_a_sidecar_configmap():
    proc = helm_template("--set", "dashboard.labels.release=kube-prometheus-stack",
                         "--set", "dashboard.annotations.grafana_folder=Training")
    assert proc.returncode == 0, proc.stderr
    cm = yaml.safe_load(proc.stdout)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "team-a"
    labels = cm["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "1" and labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/instance"] == "run-1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert json.loads(cm["data"]["dat-training-dashboard.json"]) == json.loads(DASHBOARD_FILE.read_text())
    import kubernetes_validate

    kubernetes_validate.validate(cm, "1.33", strict=True)

    moved = yaml.safe_load(helm_template("--set", "dashboard.namespace=monitoring").stdout)
    assert moved["metadata"]["namespace"] == "monitoring"
    off = helm_template("--set", "dashboard.enabled=false", show_only=False)
    assert off.returncode == 0, off.stderr
    kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(off.stdout) if d]
    assert kinds and ("ConfigMap", "run-1-dashboard") not in kinds
