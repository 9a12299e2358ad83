"""`datctl exporter` against recorded PyTorchJob list/watch traffic replayed over HTTP to the real kubernetes
client: an API error, a watch the server ends, an expired watch (410), a dropped connection, a deletion."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from controller.exporter import EXPORTED, JobStore
from controller.schemas import crd_problems
from recorded_watch.replay import HERE as RECORDED, ReplayServer

ROOT = Path(__file__).resolve().parents[1]
PJ = {"kind": "PyTorchJob"}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(port: int, host: str = "127.0.0.1") -> dict[tuple, float]:
    """{(name, sorted label items): value} of one scrape, or {} while the endpoint is not up."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float | None:
    return scrape.get((name, tuple(sorted(labels.items()))))


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def start_exporter(tmp_path: Path, replay: ReplayServer, *extra: str,
                   address: str | None = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "controller.exporter", "--kubeconfig", str(replay.kubeconfig(tmp_path)),
           "--port", str(port), *(["--address", address] if address else []), "--retry-seconds", "0.05",
           "--max-retry-seconds", "0.2", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    return out


def test_recorded_jobs_match_their_crds():
    objects = []
    for path in sorted(RECORDED.glob("*list*.json")):
        objects += json.loads(path.read_text())["items"]
    for path in sorted(RECORDED.glob("*watch*.jsonl")):
        for line in path.read_text().splitlines():
            if line.endswith("}"):
                event = json.loads(line)
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    objects.append(event["object"])
    assert len(objects) >= 20 and {o["kind"] for o in objects} == {"PyTorchJob", "TrainJob"}
    for obj in objects:
        assert crd_problems(obj) == [], obj["metadata"]["name"]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_by_default_the_exporter_serves_ipv4_and_ipv6(tmp_path):
    """As the trainer's endpoint does: a cluster may be IPv4, IPv6 or dual-stack."""
    with ReplayServer() as replay:
        proc, port = start_exporter(tmp_path, replay, address=None)
        try:
            assert wait_for(lambda: metrics(port), what="the exporter on 127.0.0.1")
            if ipv6_loopback():
                assert metrics(port, "[::1]")
        finally:
            out = stop(proc)
    assert "on *:" in out


def test_exporter_survives_api_error_expiry_and_dropped_connection(tmp_path):
    with ReplayServer() as replay:
        proc, port = start_exporter(tmp_path, replay)
        try:
            # watch 3 has delivered dat-small's failure and waits to cut the connection
            wait_for(replay.paused.is_set, what="the watch that will be dropped")
            mid = wait_for(lambda: (lambda m: m if value(m, "dat_job_condition", **PJ, job_namespace="team-a",
                                                         job_name="dat-small", condition="Failed") == 1 else None)(
                metrics(port)), what="dat-small failed")
            assert value(mid, "dat_exporter_watch_errors_total", **PJ, reason="api") == 1  # the 500 on the first list
            assert value(mid, "dat_exporter_watch_errors_total", **PJ, reason="expired") == 1
            assert value(mid, "dat_exporter_watch_errors_total", **PJ, reason="connection") == 0
            assert value(mid, "dat_exporter_lists_total", **PJ) == 2
            # dat-old was deleted while the watch was expired: the re-list dropped it
            assert value(mid, "dat_job_condition", **PJ, job_namespace="team-b", job_name="dat-old",
                         condition="Succeeded") is None
            assert value(mid, "dat_job_condition", **PJ, job_namespace="team-b", job_name="dat-new",
                         condition="Running") == 1
            replay.resume.set()

            def settled():
                m = metrics(port)
                done = replay.consumed == len(replay.exchanges) and value(
                    m, "dat_exporter_watch_events_total", **PJ, type="DELETED") == 1
                return m if done else None

            final = wait_for(settled, what="the last watch's events")
            exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        finally:
            out = stop(proc)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert replay.mismatches == [], replay.mismatches
    assert [(kind, rv) for kind, _, rv in replay.requests] == [
        ("list", ""), ("list", ""), ("watch", "1000"), ("watch", "1005"), ("list", ""), ("watch", "2000"),
        ("list", ""), ("watch", "3000")]
    assert all(path == "/apis/kubeflow.org/v1/pytorchjobs" for _, path, _ in replay.requests)

    a = {"job_namespace": "team-a"}
    assert value(final, "dat_exporter_watch_errors_total", **PJ, reason="connection") == 1
    assert value(final, "dat_exporter_lists_total", **PJ) == 3
    assert value(final, "dat_exporter_jobs", **PJ) == 2
    # dat-resnet: restarted during watch 1 (one transition seen in two events) and again before list 3
    assert value(final, "dat_job_restarts_total", **PJ, **a, job_name="dat-resnet") == 2
    assert value(final, "dat_job_condition", **PJ, **a, job_name="dat-resnet", condition="Running") == 1
    assert value(final, "dat_job_condition", **PJ, **a, job_name="dat-resnet", condition="Restarting") == 0
    assert value(final, "dat_job_start_timestamp_seconds", **PJ, **a, job_name="dat-resnet") == ts(
        "2026-11-20T08:00:05Z")
    assert value(final, "dat_job_completion_timestamp_seconds", **PJ, **a, job_name="dat-resnet") is None
    assert value(final, "dat_job_replicas", **PJ, **a, job_name="dat-resnet", replica="worker",
                 state="active") == 2
    assert value(final, "dat_job_replicas", **PJ, **a, job_name="dat-resnet", replica="master",
                 state="active") == 1
    # dat-small failed
    small = {**a, "job_name": "dat-small"}
    conditions = {c: value(final, "dat_job_condition", **PJ, **small, condition=c)
                  for c in ("Created", "Running", "Restarting", "Succeeded", "Suspended", "Failed")}
    assert conditions == {"Created": 1, "Running": 0, "Restarting": 0, "Succeeded": 0, "Suspended": 0, "Failed": 1}
    assert value(final, "dat_job_completion_timestamp_seconds", **PJ, **small) == ts("2026-11-20T09:10:00Z")
    assert value(final, "dat_job_replicas", **PJ, **small, replica="master", state="failed") == 1
    assert value(final, "dat_job_restarts_total", **PJ, **small) == 0
    # dat-new was deleted in watch 4
    assert not any(dict(labels).get("job_name") == "dat-new" for _, labels in final)

    assert shutil.which("promtool"), "promtool is missing: run `make prometheus` (Debian package prometheus)"
    check = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_trainjobs_and_pytorchjobs_from_one_exporter(tmp_path):
    """`--api pytorchjob,trainjob`: one watch per kind, the same metric families, told apart by `kind`."""
    trainjobs = "/apis/trainer.kubeflow.org/v1alpha1/trainjobs"
    with ReplayServer(also={trainjobs: RECORDED / "trainjob-session.json"}) as replay:
        replay.resume.set()
        proc, port = start_exporter(tmp_path, replay, "--api", "pytorchjob,trainjob")
        try:
            def settled():
                m = metrics(port)
                done = (replay.consumed_of(trainjobs) == 2 and replay.consumed == len(replay.exchanges)
                        and value(m, "dat_exporter_watch_events_total", kind="TrainJob", type="DELETED") == 1
                        and value(m, "dat_exporter_watch_events_total", **PJ, type="DELETED") == 1)
                return m if done else None

            final = wait_for(settled, what="both kinds' watches")
        finally:
            out = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert replay.mismatches == [], replay.mismatches
    tj = {"kind": "TrainJob", "job_namespace": "team-a"}
    assert value(final, "dat_exporter_jobs", kind="TrainJob") == 2  # dat-v2-done was deleted
    assert value(final, "dat_exporter_jobs", **PJ) == 2
    assert value(final, "dat_exporter_lists_total", kind="TrainJob") == 1
    conditions = {c: value(final, "dat_job_condition", **tj, job_name="dat-v2-small", condition=c)
                  for c in ("Created", "Suspended", "Complete", "Failed")}
    assert conditions == {"Created": 1, "Suspended": 0, "Complete": 0, "Failed": 1}
    assert value(final, "dat_job_completion_timestamp_seconds", **tj, job_name="dat-v2-small") == ts(
        "2026-11-21T10:45:00Z")
    assert value(final, "dat_job_completion_timestamp_seconds", **tj, job_name="dat-v2-resnet") is None
    assert value(final, "dat_job_condition", **tj, job_name="dat-v2-resnet", condition="Failed") == 0
    assert value(final, "dat_job_replicas", **tj, job_name="dat-v2-resnet", replica="node", state="ready") == 2
    assert value(final, "dat_job_replicas", **tj, job_name="dat-v2-small", replica="node", state="failed") == 1
    assert value(final, "dat_job_restarts_total", **tj, job_name="dat-v2-small") is None  # TrainJobs report none
    assert not any(dict(labels).get("job_name") == "dat-v2-done" for _, labels in final)
    assert value(final, "dat_job_condition", **PJ, job_namespace="team-a", job_name="dat-small",
                 condition="Failed") == 1


def test_unknown_api_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "controller.exporter", "--api", "pytorchjob,mpijob",
                           "--port", str(free_port())], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("datctl exporter: --api takes pytorchjob, trainjob (comma-separated), "
                                   "got 'pytorchjob,mpijob'")


def test_one_namespace_uses_the_namespaced_api(tmp_path):
    with ReplayServer(path_prefix="/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs") as replay:
        proc, port = start_exporter(tmp_path, replay, "--namespace", "team-a")
        try:
            wait_for(lambda: len(replay.requests) >= 3, what="list and watch requests")
        finally:
            stop(proc)
    assert replay.mismatches == []
    assert [kind for kind, _, _ in replay.requests[:3]] == ["list", "list", "watch"]


def test_missing_kubeconfig_is_a_one_line_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run([sys.executable, "-m", "controller.exporter", "--kubeconfig", str(tmp_path / "nope"),
                           "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("datctl exporter: cannot load Kubernetes credentials")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("case", ["broken", "unknown-context"])
def test_kubeconfig_mistakes_are_one_line(case, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    if case == "broken":
        config = tmp_path / "kc"
        config.write_text("garbage: [\n")
        args, line = ["--kubeconfig", str(config)], f"kubeconfig {config}: not valid YAML (line 2, column 1)"
    else:
        config = tmp_path / "kc"
        config.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "a",
                                      "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                                      "users": [{"name": "u", "user": {"token": "t"}}],
                                      "contexts": [{"name": n, "context": {"cluster": "c", "user": "u"}}
                                                   for n in ("a", "b")]}))
        args = ["--kubeconfig", str(config), "--context", "nope"]
        line = f"context 'nope' not in kubeconfig {config} (contexts: a, b)"
    proc = subprocess.run([sys.executable, "-m", "controller.exporter", *args, "--port", str(free_port())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"datctl exporter: cannot load Kubernetes credentials: {line}"), proc.stderr


def test_datctl_exporter_runs_with_the_arguments_the_chart_passes(tmp_path):
    """The Deployment runs `datctl exporter --api=API --namespace=NS --port=PORT`: the CLI must hand them on."""
    datctl = Path(sys.executable).parent / "datctl"
    assert datctl.exists(), f"{datctl} missing: install the project (make venv)"
    port = free_port()
    with ReplayServer(path_prefix="/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs") as replay:
        replay.resume.set()
        env = dict(os.environ, PYTHONPATH=str(ROOT), KUBECONFIG=str(replay.kubeconfig(tmp_path)))
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = subprocess.Popen([str(datctl), "exporter", "--api=pytorchjob", "--namespace=team-a", f"--port={port}",
                                 "--retry-seconds=0.05"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            scrape = wait_for(lambda: proc.poll() is not None or (lambda m: m if value(
                m, "dat_exporter_lists_total", **PJ) else None)(metrics(port)), what="datctl exporter serving")
        finally:
            out = stop(proc)
    assert scrape is not True and proc.returncode == 0, out
    assert replay.mismatches == []


@pytest.mark.parametrize("flags", [["--retry-seconds", "nan"], ["--retry-seconds", "0"],
                                   ["--max-retry-seconds", "inf"], ["--watch-timeout", "0"]])
def test_bad_retry_settings_are_refused(flags):
    """A NaN pause slipped past `<= 0` and re-listed the API hundreds of times a second."""
    proc = subprocess.run([sys.executable, "-m", "controller.exporter", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "--watch-timeout must be >= 1 and 0 < --retry-seconds" in proc.stderr


def test_a_failed_job_without_completion_time_ends_when_failed_turned_true():
    """DATJobFailed counts its window from the completion time: a Failed PyTorchJob whose operator left
    status.completionTime unset still gets one (the Failed condition's lastTransitionTime)."""
    from controller.exporter import EXPORTED, JobState
    failed = {"type": "Failed", "status": "True", "lastTransitionTime": "2026-11-20T09:10:00Z"}
    obj = {"metadata": {"namespace": "a", "name": "j"},
           "status": {"startTime": "2026-11-20T09:00:00Z", "conditions": [
               {"type": "Created", "status": "True", "lastTransitionTime": "2026-11-20T08:59:00Z"}, failed]}}
    job = JobState.from_object(obj, EXPORTED["pytorchjob"])
    assert (job.start, job.completion) == (ts("2026-11-20T09:00:00Z"), ts("2026-11-20T09:10:00Z"))
    obj["status"]["completionTime"] = "2026-11-20T09:11:00Z"  # the operator's own figure wins
    assert JobState.from_object(obj, EXPORTED["pytorchjob"]).completion == ts("2026-11-20T09:11:00Z")
    failed["status"] = "False"
    del obj["status"]["completionTime"]
    assert JobState.from_object(obj, EXPORTED["pytorchjob"]).completion is None  # still running


def test_a_job_recreated_under_the_same_name_starts_its_restart_count_afresh() -> None:
    def restarting(uid: str, when: str) -> dict:
        return {"metadata": {"namespace": "a", "name": "dat-resnet", "uid": uid},
                "status": {"conditions": [{"type": "Restarting", "status": "True", "lastTransitionTime": when}]}}

    store = JobStore(EXPORTED["pytorchjob"])
    store.upsert(restarting("uid-1", "2026-11-28T10:00:00Z"))
    store.upsert(restarting("uid-1", "2026-11-28T10:00:00Z"))  # the same transition in a second event
    store.upsert(restarting("uid-1", "2026-11-28T10:05:00Z"))
    assert len(store.snapshot()[0].restart_marks) == 2
    store.replace([restarting("uid-2", "2026-11-28T11:00:00Z")])  # deleted and submitted again: a new uid
    assert len(store.snapshot()[0].restart_marks) == 1
    store.upsert(restarting("uid-2", "2026-11-28T11:30:00Z"))
    assert len(store.snapshot()[0].restart_marks) == 2
