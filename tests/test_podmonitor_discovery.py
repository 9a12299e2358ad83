"""The chart's PodMonitors, as a real Prometheus applies them to the targets it discovers from trainer pods.

Debian's Prometheus is built without Kubernetes discovery, so the targets its pod role would discover are
handed to it as file_sd target groups with the same `__meta_kubernetes_*` labels. The scrape config is what
prometheus-operator generates from a PodMonitor: keep the pods its selector matches, keep the endpoint's
port, then the endpoint's relabelings; Prometheus itself evaluates all of it. A TrainJob's pods
declare no container ports (its runtime patch cannot), so its PodMonitor must find the trainer container and
its address by relabeling alone: one target per node pod, at podIP:metrics.port, whatever init containers and
sidecars the pod also has, IPv6 pods included. The trainer's exporter code serves the metrics on each address.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from test_prometheus_e2e import CHART, Prometheus, free_port, http_get, tool, wait_for
from trainer.observability import serve_metrics

NAMESPACE = "team-a"
RELEASE = "c10"


def render(*settings: str) -> list[dict]:
    args = [x for s in settings for x in ("--set", s)]
    proc = subprocess.run([tool("helm", "tools"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           "--set", "metrics.podMonitor=true", "--set", "dashboard.enabled=false", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [obj for obj in yaml.safe_load_all(proc.stdout) if obj]


def snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def operator_scrape_config(monitor: dict, targets_file: Path) -> dict:
    """prometheus-operator's translation of a PodMonitor's first endpoint (the parts that pick targets)."""
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    relabel = []
    for name, value in monitor["spec"]["selector"]["matchLabels"].items():
        label = re.sub(r"[^a-zA-Z0-9_]", "_", name)
        relabel.append({"action": "keep", "regex": f"({value});true",
                        "source_labels": [f"__meta_kubernetes_pod_label_{label}",
                                          f"__meta_kubernetes_pod_labelpresent_{label}"]})
    if "port" in endpoint:
        relabel.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": endpoint["port"]})
    relabel += [{"action": "replace", "source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"action": "replace", "source_labels": ["__meta_kubernetes_pod_container_name"],
                 "target_label": "container"}]
    relabel += [{snake(k): v for k, v in rule.items()} for rule in endpoint.get("relabelings", [])]
    return {"job_name": f"podMonitor/{NAMESPACE}/{monitor['metadata']['name']}/0",
            "metrics_path": endpoint["path"], "scrape_interval": "1s", "scrape_timeout": "900ms",
            "file_sd_configs": [{"files": [str(targets_file)]}],
            "relabel_configs": relabel}


def pod(name: str, labels: dict, ip: str, containers: list[dict], init: tuple[str, ...] = ()) -> dict:
    return {"metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": containers, "initContainers": [{"name": n} for n in init]},
            "status": {"phase": "Running", "podIP": ip}}


def discovered_targets(pods: list[dict]) -> list[dict]:
    """The targets Prometheus' `kubernetes_sd_configs` role `pod` makes of these pods, as its documentation
    gives them: one per declared container port at podIP:port, one per container without ports at podIP."""
    groups = []
    for p in pods:
        ip = p["status"]["podIP"]
        meta = {
            "__meta_kubernetes_namespace": p["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": p["metadata"]["name"], "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": p["status"]["phase"]}
        for key, value in p["metadata"]["labels"].items():
            label = re.sub(r"[^a-zA-Z0-9_]", "_", key)
            meta[f"__meta_kubernetes_pod_label_{label}"] = value
            meta[f"__meta_kubernetes_pod_labelpresent_{label}"] = "true"
        for init, containers in (("false", p["spec"]["containers"]), ("true", p["spec"]["initContainers"])):
            for c in containers:
                labels = dict(meta, __meta_kubernetes_pod_container_name=c["name"],
                              __meta_kubernetes_pod_container_init=init)
                for port in c.get("ports", []):
                    host = f"[{ip}]" if ":" in ip else ip
                    groups.append({"targets": [f"{host}:{port['containerPort']}"], "labels": dict(
                        labels, __meta_kubernetes_pod_container_port_name=port.get("name", ""),
                        __meta_kubernetes_pod_container_port_number=str(port["containerPort"]))})
                if not c.get("ports"):
                    groups.append({"targets": [ip], "labels": labels})
    return groups


def active_targets(prom: Prometheus, job: str) -> list[dict]:
    targets = prom.api("targets", state="active")["data"]["activeTargets"]
    return [t for t in targets if t["labels"].get("job") == job]


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_podmonitor_finds_one_trainer_target_per_pod(api: str, tmp_path: Path) -> None:
    metrics_port, prom_port = free_port(), free_port()
    objects = render(f"api={api}", f"metrics.port={metrics_port}")
    monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    if api == "trainjob":
        job = next(o for o in objects if o["kind"] == "TrainJob")
        template = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pod_labels = template["template"]["spec"]["template"]["metadata"]["labels"]
        trainer = {"name": "node", "image": "dat"}  # TrainJob pods declare no ports
    else:
        job = next(o for o in objects if o["kind"] == "PyTorchJob")
        template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
        pod_labels = template["metadata"]["labels"]
        trainer = {"name": "pytorch", "image": "dat", "ports": template["spec"]["containers"][0]["ports"]}
    pod_labels = dict(pod_labels, **{"jobset.sigs.k8s.io/jobset-name": RELEASE})
    sidecar = {"name": "log-shipper", "image": "fluent-bit"}
    other_labels = dict(pod_labels, **{"app.kubernetes.io/instance": "someone-else"})
    pods = [pod(f"{RELEASE}-node-0-0", pod_labels, "127.0.0.1", [trainer, sidecar], init=("fetch-data",)),
            pod(f"{RELEASE}-node-0-1", pod_labels, "127.0.0.2", [trainer]),
            pod(f"{RELEASE}-node-0-2", pod_labels, "::1", [trainer]),
            pod("other-node-0-0", other_labels, "127.0.0.3", [trainer])]

    registry = CollectorRegistry()
    Gauge("dat_discovery_probe", "served by the trainer's exporter code", registry=registry).set(1)
    server = serve_metrics(metrics_port, registry)
    (tmp_path / "pods.json").write_text(json.dumps(discovered_targets(pods)))
    scrape = operator_scrape_config(monitor, tmp_path / "pods.json")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": [scrape]}))
    prom_proc = subprocess.Popen([tool("prometheus", "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                  f"--web.listen-address=127.0.0.1:{prom_port}",
                                  f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                                 stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        prom = Prometheus(prom_port)
        wait_for(lambda: "Ready" in http_get(f"{prom.base}/-/ready"), 60, "Prometheus ready")
        want = {f"127.0.0.1:{metrics_port}": f"{RELEASE}-node-0-0", f"127.0.0.2:{metrics_port}": f"{RELEASE}-node-0-1",
                f"[::1]:{metrics_port}": f"{RELEASE}-node-0-2"}

        def all_up() -> list[dict] | None:
            targets = active_targets(prom, scrape["job_name"])
            return targets if len(targets) >= len(want) and all(t["health"] == "up" for t in targets) else None

        try:
            targets = wait_for(all_up, 60, "every trainer target scraped")
        except AssertionError:
            raise AssertionError(f"targets: {active_targets(prom, scrape['job_name'])}; "
                                 f"log: {(tmp_path / 'prometheus.log').read_text()[-2000:]}") from None
        found = sorted((t["labels"]["instance"], t["labels"]["pod"], t["labels"]["container"]) for t in targets)
        assert found == sorted((instance, pod_name, trainer["name"]) for instance, pod_name in want.items())
        series = wait_for(lambda: prom.query("dat_discovery_probe", time.time()), 30, "probe series")
        assert sorted(s["metric"]["instance"] for s in series) == sorted(want)
    finally:
        prom_proc.terminate()
        prom_proc.wait(timeout=30)
        server.shutdown()
