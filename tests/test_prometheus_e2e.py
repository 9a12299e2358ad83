"""End to end against a real Prometheus: a two-rank torchrun training run on synthetic data serves its metrics
on one port, `datctl exporter` serves job states from recorded watch traffic, Prometheus scrapes both every
second and evaluates the alerting rules. Then, through Prometheus' HTTP API: every metric arrived with the
right labels and plausible values, and every dashboard and alert expression parses and returns data."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import SYNTHETIC, free_port, read_jsonl, torch_env, torchrun
from recorded_watch.replay import ReplayServer

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dat-training"
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE = CHART / "files" / "dat-training-dashboard.json"
JOB = "dat-e2e-run"
NAMESPACE = "dat-e2e"
RECORDED_NAMESPACE = "team-a"  # jobs in tests/recorded_watch
EPOCHS = 4
PHASES = ("data", "attack", "compute", "communication", "optimizer", "eval", "checkpoint")


def tool(name: str, installer: str) -> str:
    path = shutil.which(name) or (str(ROOT / "bin" / name) if (ROOT / "bin" / name).exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make {installer}`")
    return path


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params) -> dict:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            body = json.loads(http_get(url, timeout=10))
        except urllib.error.HTTPError as exc:  # 400 with a PromQL parse error
            body = json.loads(exc.read().decode())
        return body

    def query(self, expr: str, at: float) -> list[dict]:
        body = self.api("query", query=expr, time=f"{at:.3f}")
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def values(self, expr: str, at: float) -> dict[tuple, float]:
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr, at)}

    def one(self, expr: str, at: float) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])


class LastScrape(threading.Thread):
    """Keeps the last exposition a /metrics endpoint served (for `promtool check metrics`)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.text, self.done = port, "", threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.text = http_get(f"http://127.0.0.1:{self.port}/metrics", timeout=2)
            except OSError:
                pass
            self.done.wait(0.2)


def bool_form(expr: str) -> str:
    """The alert expression with its outermost comparison made a `bool` one, so that it returns a series
    whether or not the threshold is crossed (filters nested in parentheses stay filters)."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in ("==", "!=", ">=", "<=", ">", "<"):
                if expr.startswith(op, i) and not expr.startswith("=~", i):
                    return expr[: i + len(op)] + " bool" + expr[i + len(op):]
        i += 1
    raise AssertionError(f"no top-level comparison in {expr}")


def panel_expr(expr: str) -> str:
    """Grafana variables filled in: the training run for trainer panels; for the job-state panels, the
    namespace of the recorded cluster the exporter watches."""
    namespace, job = (RECORDED_NAMESPACE, ".*") if "dat_job_" in expr else (NAMESPACE, JOB)
    return (expr.replace("$namespace", namespace).replace("$job", job).replace("$rank", ".*")
            .replace("$__rate_interval", "1m").replace("$__interval", "5s").replace("$__range", "10m"))


def promtool_check_metrics(text: str) -> None:
    proc = subprocess.run([tool("promtool", "prometheus"), "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def stack(tmp_path):
    """Prometheus scraping the (future) trainer port and a running `datctl exporter` fed by the replay."""
    trainer_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    release_rules = subprocess.run(
        [tool("helm", "tools"), "template", JOB, str(CHART), "--namespace", NAMESPACE, "--show-only",
         "templates/prometheusrule.yaml", "--set", "alerts.enabled=true"], capture_output=True, text=True, timeout=120)
    assert release_rules.returncode == 0, release_rules.stderr
    release_groups = yaml.safe_load(release_rules.stdout)["spec"]["groups"]
    for group in release_groups:
        group["name"] += "-release"
    (tmp_path / "release-rules.yaml").write_text(yaml.safe_dump({"groups": release_groups}))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE), str(tmp_path / "release-rules.yaml")],
        "scrape_configs": [
            {"job_name": "dat-trainer", "static_configs": [{
                "targets": [f"127.0.0.1:{trainer_port}"],
                "labels": {"namespace": NAMESPACE, "pod": f"{JOB}-master-0"}}]},
            {"job_name": "dat-exporter", "static_configs": [{
                "targets": [f"127.0.0.1:{exporter_port}"],
                "labels": {"namespace": "dat-system", "pod": "dat-exporter-0"}}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen([tool("prometheus", "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    replay = ReplayServer().__enter__()
    replay.resume.set()  # no pausing: run through the recorded session at once
    # the module itself; test_exporter.py checks that `datctl exporter` hands its arguments to it
    exporter = subprocess.Popen([sys.executable, "-m", "controller.exporter", "--kubeconfig",
                                 str(replay.kubeconfig(tmp_path)), "--port", str(exporter_port),
                                 "--address", "127.0.0.1", "--retry-seconds", "0.05"],
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                                stderr=(tmp_path / "exporter.log").open("w"))
    try:
        wait_for(lambda: "Ready" in http_get(f"http://127.0.0.1:{prom_port}/-/ready"), 60, "Prometheus ready")
        yield {"prometheus": Prometheus(prom_port), "trainer_port": trainer_port, "exporter_port": exporter_port,
               "replay": replay}
    finally:
        exporter.send_signal(signal.SIGTERM)
        prom.terminate()
        replay.__exit__(None, None, None)
        exporter.wait(timeout=20)
        prom.wait(timeout=30)


def test_training_metrics_dashboard_and_alerts_in_prometheus(stack, tmp_path):
    prom: Prometheus = stack["prometheus"]
    out = tmp_path / "run"
    trainer_scrape = LastScrape(stack["trainer_port"])
    trainer_scrape.start()
    t_start = time.time()
    env = torch_env(DAT_JOB_NAME=JOB, DAT_METRICS_DIR=str(tmp_path / "exchange"))
    torchrun(["-m", "trainer", *SYNTHETIC, "--set", "data.synthetic_train_size=1536", "--set", f"run.epochs={EPOCHS}",
              "--set", f"run.output_dir={out}", "--set", f"metrics.port={stack['trainer_port']}",
              "--set", "metrics.grace_seconds=4", "--set", "jointspar.enabled=true", "--set", "jointspar.budget=8"],
             nproc=2, env=env)
    trainer_scrape.done.set()
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    last = records[-1]

    # Evaluation times: during training (finished == 0) and in the grace period (both ranks finished).
    span = {"start": f"{t_start:.3f}", "end": f"{time.time():.3f}", "step": "0.5"}

    def last_time(expr: str, accept) -> float:
        body = prom.api("query_range", query=expr, **span)
        assert body["status"] == "success", body
        times = [float(t) for series in body["data"]["result"] for t, v in series["values"] if accept(float(v))]
        assert times, f"Prometheus never saw the wanted value of {expr}"
        return max(times)

    t_final = last_time(f'count(dat_training_finished{{job_name="{JOB}"}} == 1)', lambda v: v == 2)
    t_run = last_time(f'count(dat_training_finished{{job_name="{JOB}"}} == 0)', lambda v: v >= 1)
    assert t_run < t_final

    # ---- every trainer metric, both ranks, labels ----
    target = {"job": "dat-trainer", "namespace": NAMESPACE, "pod": f"{JOB}-master-0", "job_name": JOB,
              "node_rank": "0"}
    per_rank = ["dat_epoch_duration_seconds", "dat_epoch_train_duration_seconds", "dat_phase_duration_seconds",
                "dat_phase_seconds_total", "dat_communication_bytes_total", "dat_dense_communication_bytes_total",
                "dat_epoch_communication_bytes", "dat_epoch_dense_communication_bytes",
                "dat_communication_calls_total", "dat_images_total", "dat_last_epoch_timestamp_seconds",
                "dat_progress_timestamp_seconds", "dat_training_finished", "dat_training_outcome"]
    job_wide = ["dat_epoch", "dat_epoch_progress_ratio", "dat_images_per_second", "dat_train_loss",
                "dat_train_clean_accuracy", "dat_train_robust_accuracy", "dat_test_clean_accuracy",
                "dat_test_robust_accuracy", "dat_learning_rate", "dat_jointspar_active_layers",
                "dat_jointspar_active_fraction", "dat_run_info"]
    for names, want in ((per_rank, ["0", "1"]), (job_wide, ["0"])):
        for name in names:
            series = prom.query(name, t_final)
            ranks = sorted({s["metric"]["rank"] for s in series})
            assert ranks == want, f"{name}: ranks {ranks}"
            for s in series:
                labels = s["metric"]
                assert {k: labels.get(k) for k in target} == target, labels
                assert labels["local_rank"] == labels["rank"], labels
    phases = {s["metric"]["phase"] for s in prom.query("dat_phase_duration_seconds", t_final)}
    assert phases == set(PHASES)
    info = prom.query('dat_run_info{rank="0"}', t_final)[0]["metric"]
    assert {k: info[k] for k in ("model", "attack", "optimizer", "loss", "jointspar", "world_size")} == {
        "model": "small_cnn", "attack": "pgd-3", "optimizer": "lamb", "loss": "dat", "jointspar": "on",
        "world_size": "2"}

    # ---- plausible values ----
    for rank in ("0", "1"):
        sel = f'{{job_name="{JOB}", rank="{rank}"}}'
        epoch_seconds = prom.one(f"dat_epoch_duration_seconds{sel}", t_final)
        phase_sum = prom.one(f"sum(dat_phase_duration_seconds{sel})", t_final)
        assert abs(phase_sum - epoch_seconds) <= 0.1 * epoch_seconds, (rank, phase_sum, epoch_seconds)
        eval_seconds = prom.one(f'dat_phase_duration_seconds{{job_name="{JOB}", rank="{rank}", phase="eval"}}', t_final)
        assert prom.one(f"dat_epoch_train_duration_seconds{sel}", t_final) == pytest.approx(epoch_seconds - eval_seconds)
        # the gradient payload is the same on every rank: it matches the records rank 0 wrote
        assert prom.one(f"dat_communication_bytes_total{sel}", t_final) == sum(r["comm_bytes"] for r in records)
        assert prom.one(f"dat_dense_communication_bytes_total{sel}", t_final) == sum(
            r["dense_comm_bytes"] for r in records)
        assert prom.one(f"dat_epoch_communication_bytes{sel}", t_final) == last["comm_bytes"]
        assert prom.one(f"dat_epoch_dense_communication_bytes{sel}", t_final) == last["dense_comm_bytes"]
        assert prom.one(f"dat_communication_calls_total{sel}", t_final) == sum(r["comm_calls"] for r in records)
        assert prom.one(f'dat_training_outcome{{job_name="{JOB}", rank="{rank}", outcome="completed"}}', t_final) == 1
    # summed over ranks, the images counters are the job's
    assert prom.one(f'sum(dat_images_total{{job_name="{JOB}"}})', t_final) == sum(r["images"] for r in records)
    assert sum(r["comm_bytes"] for r in records) < sum(r["dense_comm_bytes"] for r in records)  # JointSpar saves
    rank0 = f'{{job_name="{JOB}", rank="0"}}'
    assert prom.one(f"dat_epoch{rank0}", t_final) == EPOCHS
    assert prom.one(f"dat_epoch{rank0} + dat_epoch_progress_ratio{rank0}", t_final) == EPOCHS
    for metric, key in (("dat_test_clean_accuracy", "test_clean_acc"), ("dat_test_robust_accuracy", "test_robust_acc"),
                        ("dat_train_loss", "train_loss"), ("dat_learning_rate", "lr"),
                        ("dat_images_per_second", "images_per_second"),
                        ("dat_jointspar_active_fraction", "jointspar_active_fraction")):
        assert prom.one(f"{metric}{rank0}", t_final) == pytest.approx(last[key], rel=1e-9), metric
    assert prom.one(f"dat_jointspar_active_layers{rank0}", t_final) > 0
    assert prom.one(f"dat_training_finished{rank0}", t_run) == 0
    assert prom.one(f"dat_epoch_duration_seconds{rank0}", t_final) == pytest.approx(last["epoch_seconds"])
    assert prom.one(f'dat_phase_duration_seconds{{job_name="{JOB}", rank="0", phase="communication"}}',
                    t_final) == pytest.approx(last["comm_seconds"])

    # ---- every dashboard expression parses and returns data ----
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        if query.startswith("query_result("):  # Grafana runs the query and applies the variable's regex
            label = re.fullmatch(r'/(\w+)="\(\[\^"\]\+\)"/', variable["regex"]).group(1)
            inner = query[len("query_result("):-1].replace("$namespace", ".*").replace("$__range", "1h")  # "All"
            values = {s["metric"][label] for s in prom.query(inner, t_final)}
            # the trainer's job and namespace, and the recorded cluster's jobs (which serve no trainer metrics)
            assert {"job": {JOB, "dat-small"}, "namespace": {NAMESPACE, RECORDED_NAMESPACE}}[variable["name"]] \
                <= values, (variable["name"], values)
            continue
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query).groups()
        body = prom.api(f"label/{label}/values", **{"match[]": panel_expr(metric)}, start=f"{t_start:.3f}",
                        end=f"{t_final:.3f}")
        assert body["status"] == "success" and body["data"], (variable["name"], body)
    checked = 0
    for panel in dashboard["panels"]:
        for target_ in panel.get("targets", []):
            expr = panel_expr(target_["expr"])
            assert prom.query(expr, t_final), f"panel {panel['title']!r}: no data for {expr}"
            checked += 1
    assert checked >= 20
    states = prom.values('max by (job_namespace, job_name, condition) (dat_job_condition) == 1', t_final)
    assert (("condition", "Failed"), ("job_name", "dat-small"), ("job_namespace", "team-a")) in states

    # ---- every alert expression parses and returns data; the rules load and evaluate cleanly ----
    loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
    # the plain file (9 rules) and this release's rules (without DATExporterDown: exporter.enabled is false)
    assert sorted(r["name"] for r in loaded).count("DATExporterDown") == 1 and len(loaded) == 17
    for rule in loaded:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    for rule in loaded:
        expr, name = rule["query"], rule["name"]
        release = f'job_name="{JOB}"' in expr
        if name in ("DATJobFailed", "DATJobRestartingRepeatedly") and release:
            continue  # the recorded cluster has no job of this release
        if name == "DATJobFailed":  # dat-small failed on 2026-11-20, long before this Prometheus started
            failed = expr.split(" and on (job_namespace, job_name) ")[0]
            assert prom.query(bool_form(failed), t_final), f"{name}: no data for {failed}"
            assert prom.query(expr, t_final) == [], f"{name}: the failure is older than the window"
            continue
        if name == "DATExporterDown":
            assert prom.query(expr, t_final) == [], "the exporter is up"
        elif name == "DATJobWithoutMetrics":
            # the recorded cluster's running jobs serve no trainer metrics; this release's job does
            unmonitored = {s["metric"]["job_name"] for s in prom.query(expr, t_final)}
            assert unmonitored if not release else unmonitored == set(), (name, unmonitored)
            assert JOB not in unmonitored
        elif name == "DATTrainingStalled":
            probe = bool_form(expr)
            assert prom.query(probe, t_run), f"{name}: no data while training: {probe}"
            assert prom.query(probe, t_final) == [], f"{name} must ignore finished runs"
        elif name == "DATTrainingAborted":
            assert prom.query(expr, t_final) == [], f"{name}: the run completed"
        else:
            probe = bool_form(expr)
            assert prom.query(probe, t_final), f"{name}: no data for {probe}"

    # ---- exposition formats ----
    assert 'dat_training_finished{' in trainer_scrape.text
    promtool_check_metrics(trainer_scrape.text)
    promtool_check_metrics(http_get(f"http://127.0.0.1:{stack['exporter_port']}/metrics"))
