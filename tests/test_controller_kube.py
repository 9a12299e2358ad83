"""datctl submit / status / watch / logs / delete with the real kubernetes client talking HTTP to a replay of
recorded API server answers (tests/recorded/*.json): success, CRD missing (404), RBAC (403), an existing job,
a failed create rolled back, a Failed job, an unreachable server and a missing kubeconfig."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from controller import cli, schemas, spec

sys.path.insert(0, str(Path(__file__).resolve().parent / "recorded"))
from replay import ReplayServer, kubeconfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "manifests" / "specs" / "dat-smoke.yaml")
JOBS = "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"


def datctl(capsys: pytest.CaptureFixture, scenario: str, tmp_path: Path, *argv: str) -> tuple[int, str, str, ReplayServer]:
    with ReplayServer(scenario) as server:
        config = kubeconfig(tmp_path / "kubeconfig", server.url)
        code = cli.main([*argv, "--kubeconfig", str(config)])
    out, err = capsys.readouterr()
    assert not server.mismatches, server.mismatches
    assert server.done, f"datctl stopped after {len(server.requests)} of {len(server.exchanges)} recorded exchanges"
    return code, out, err, server


def without_warnings(err: str) -> str:
    """stderr less datctl's warnings (the smoke spec keeps its checkpoints on an emptyDir)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("datctl: warning: "))


def rendered(namespace: str = "team-a", api: str | None = None) -> dict[str, dict]:
    return {o["kind"]: o for o in spec.render(spec.load_spec(SMOKE), namespace=namespace, api=api).objects}


def rendered_with(*overrides: str) -> dict[str, dict]:
    return {o["kind"]: o for o in spec.render(spec.load_spec(SMOKE, list(overrides)), namespace="team-a").objects}


OWNER = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "dat-smoke",
         "uid": "5b7f3c1e-2d4a-4f7e-9c61-0a8e1d2f3b44", "controller": True, "blockOwnerDeletion": False}


GATE = {"kueue.x-k8s.io/admission-gated-by": "dat-k8s.io/datctl"}


def held(job: dict, path: tuple[str, ...] = ("spec", "runPolicy")) -> dict:
    """The rendered job as submit creates it: suspended, gated for Kueue."""
    job = copy.deepcopy(job)
    job["metadata"]["annotations"] = {**job["metadata"].get("annotations", {}), **GATE}
    parent = job
    for key in path:
        parent = parent[key]
    parent["suspend"] = True
    return job


def test_submit_creates_the_job_held_then_its_objects_owned_by_it_then_releases_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-ok", tmp_path, "submit", SMOKE)
    assert code == 0, err
    assert "datctl: warning: checkpoint.claimName is empty: checkpoints go to an emptyDir" in err
    assert out.splitlines()[:4] == ["pytorchjob/dat-smoke created (suspended until its objects exist)",
                                    "configmap/dat-smoke-config created", "podmonitor/dat-smoke created",
                                    "pytorchjob/dat-smoke released"]
    assert "datctl watch dat-smoke -n team-a" in out
    dry_run, monitor_dry_run, configmap_dry_run, job, configmap, monitor, release = server.requests[1:]
    objects = rendered()
    assert dry_run["query"] == {"dryRun": "All"} and dry_run["body"] == job["body"] == held(objects["PyTorchJob"])
    assert "suspend" not in objects["PyTorchJob"]["spec"]["runPolicy"]  # kubectl apply of a render starts at once
    assert monitor_dry_run["query"] == {"dryRun": "All"} and monitor_dry_run["body"] == objects["PodMonitor"]
    assert configmap_dry_run["query"] == {"dryRun": "All"} and configmap_dry_run["body"] == objects["ConfigMap"]
    for created, rendered_object in ((configmap, objects["ConfigMap"]), (monitor, objects["PodMonitor"])):
        assert created["body"]["metadata"]["ownerReferences"] == [OWNER]  # owned from creation: no patch needed
        assert {**created["body"], "metadata": {**created["body"]["metadata"], "ownerReferences": None}} == {
            **rendered_object, "metadata": {**rendered_object["metadata"], "ownerReferences": None}}
    assert (release["method"], release["path"]) == ("PATCH", JOBS + "/dat-smoke")
    assert release["headers"]["content-type"] == "application/merge-patch+json"
    assert release["body"] == {"metadata": {"annotations": {"kueue.x-k8s.io/admission-gated-by": None}},
                               "spec": {"runPolicy": {"suspend": False}}}
    assert not [r for r in server.requests if r["method"] in ("PATCH", "DELETE") and r is not release]
    assert all(r["headers"].get("authorization") == "Bearer recorded-token" for r in server.requests)


@pytest.mark.parametrize("scenario,overrides,queue", [
    ("submit-kueue", ["--set", "scheduling.kueueQueue=team-a-gpus"], "team-a-gpus"),
    ("submit-kueue-default", [], "default"),  # Kueue's webhook gave it the namespace's default LocalQueue
])
def test_a_job_kueue_manages_is_created_gated_and_released_by_removing_the_gate(
        scenario: str, overrides: list[str], queue: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Kueue unsuspends a job it admits: datctl's gate keeps it from admitting the job before its objects exist,
    and the release leaves suspend to Kueue (setting it false would be undone, or start an unadmitted job)."""
    code, out, err, server = datctl(capsys, scenario, tmp_path, "submit", SMOKE, *overrides)
    assert code == 0, err
    job = next(r for r in server.requests if r["path"] == JOBS and not r["query"])
    assert job["body"]["metadata"]["annotations"]["kueue.x-k8s.io/admission-gated-by"] == "dat-k8s.io/datctl"
    assert job["body"]["spec"]["runPolicy"]["suspend"] is True
    assert job["body"]["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == (queue if overrides else None)
    release = server.requests[-1]
    assert release["body"] == {"metadata": {"annotations": {"kueue.x-k8s.io/admission-gated-by": None}}}
    assert f"pytorchjob/dat-smoke released to Kueue LocalQueue {queue} (it starts the job once admitted)" in out


def test_a_leftover_configmap_of_the_same_name_is_reported_before_anything_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-configmap-exists", tmp_path, "submit", SMOKE)
    assert code == 1 and out == ""
    assert without_warnings(err) == (
        "datctl: ConfigMap team-a/dat-smoke-config already exists: left by an earlier job dat-smoke that Kubernetes "
        "is still deleting (retry in a few seconds), or another's (choose another job name)\n")
    assert all(r["method"] == "GET" or r["query"] == {"dryRun": "All"} for r in server.requests)


def test_a_network_policy_exists_before_the_job_can_start_and_is_owned_by_it(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-networkpolicy", tmp_path, "submit", SMOKE,
                                    "--set", "networkPolicy.enabled=true")
    assert code == 0, err
    assert out.splitlines()[:5] == ["pytorchjob/dat-smoke created (suspended until its objects exist)",
                                    "networkpolicy/dat-smoke created", "configmap/dat-smoke-config created",
                                    "podmonitor/dat-smoke created", "pytorchjob/dat-smoke released"]
    policies = [r for r in server.requests if r["path"].startswith("/apis/networking.k8s.io/v1/")]
    dry_run, create = policies
    assert dry_run["query"] == {"dryRun": "All"} and dry_run["body"]["kind"] == "NetworkPolicy"
    assert create["body"] == {**dry_run["body"], "metadata": {**dry_run["body"]["metadata"], "ownerReferences": [OWNER]}}
    assert create["body"]["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    release = server.requests.index(next(r for r in server.requests if r["method"] == "PATCH"))
    assert server.requests.index(create) < release == len(server.requests) - 1


def test_a_network_policy_rbac_forbids_is_reported_before_anything_is_created(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-networkpolicy-forbidden", tmp_path, "submit", SMOKE,
                                    "--set", "networkPolicy.enabled=true")
    assert code == 1 and out == ""
    assert without_warnings(err).startswith("datctl: NetworkPolicy team-a/dat-smoke (dry run): forbidden by RBAC: ")
    assert all(r["method"] == "GET" or r["query"] == {"dryRun": "All"} for r in server.requests)


def test_a_refused_podmonitor_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-podmonitor-refused", tmp_path, "submit", SMOKE)
    assert code == 1 and out == ""
    assert without_warnings(err).startswith("datctl: PodMonitor team-a/dat-smoke (dry run): ")
    assert [r["method"] for r in server.requests] == ["GET", "POST", "POST"]  # two dry runs, nothing created


def test_submit_without_the_podmonitor_crd(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-no-podmonitor-crd", tmp_path, "submit", SMOKE)
    assert code == 0 and "no PodMonitor CRD" in err
    assert not any("podmonitors" in r["path"] for r in server.requests)


def test_submit_podmonitor_true_needs_the_crd(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with ReplayServer("submit-no-podmonitor-crd") as server:
        config = kubeconfig(tmp_path / "kubeconfig", server.url)
        code = cli.main(["submit", SMOKE, "--set", "metrics.podMonitor=true", "--kubeconfig", str(config)])
    assert code == 1 and len(server.requests) == 1  # nothing created
    assert "metrics.podMonitor is true but the PodMonitor CRD (monitoring.coreos.com/v1) is not installed" in \
        capsys.readouterr().err


def test_submit_when_the_operator_is_not_installed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-crd-missing", tmp_path, "submit", SMOKE)
    assert code == 1 and out == ""
    assert without_warnings(err) == ("datctl: PyTorchJob team-a/dat-smoke (dry run): the PyTorchJob CRD (kubeflow.org/v1) is not "
                   "installed in the cluster; install the Kubeflow training operator v1.9: kubectl apply "
                   "--server-side -k \"github.com/kubeflow/trainer.git/manifests/overlays/standalone"
                   "?ref=v1.9.4\"\n")
    assert [r["method"] for r in server.requests] == ["GET", "POST"]  # nothing was created


def test_submit_forbidden_by_rbac(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err, _ = datctl(capsys, "submit-forbidden", tmp_path, "submit", SMOKE)
    err = without_warnings(err)
    assert code == 1
    assert err.startswith("datctl: PyTorchJob team-a/dat-smoke (dry run): forbidden by RBAC: ")
    assert 'User "alice@example.com" cannot create resource "pytorchjobs"' in err and len(err.splitlines()) == 1


def test_submit_existing_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err, _ = datctl(capsys, "submit-exists", tmp_path, "submit", SMOKE)
    assert code == 1 and '"dat-smoke" already exists (delete it first: datctl delete NAME)' in err


def test_a_failed_create_after_the_job_deletes_the_held_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What was created is owned by the job: deleting it removes them, so datctl needs no delete on them."""
    code, out, err, server = datctl(capsys, "submit-rollback", tmp_path, "submit", SMOKE)
    assert code == 1 and "ConfigMap team-a/dat-smoke-config: " in err and "etcdserver: request timed out" in err
    assert (server.requests[-1]["method"], server.requests[-1]["path"]) == ("DELETE", JOBS + "/dat-smoke")
    delete = server.requests[-1]
    assert delete["query"].get("propagationPolicy") == "Background"  # the owned objects go with it
    assert not any(r["method"] == "PATCH" for r in server.requests)  # never released


def test_a_held_job_that_cannot_be_deleted_either_is_named_with_how_to_delete_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-rollback-delete-fails", tmp_path, "submit", SMOKE)
    line = without_warnings(err)
    assert code == 1 and len(line.splitlines()) == 1 and "etcdserver: request timed out" in line
    assert "; and deleting the held PyTorchJob failed too (" in line and "unable to handle the request" in line
    assert line.rstrip().endswith("datctl delete dat-smoke -n team-a")


@pytest.mark.parametrize("scenario,message", [
    ("submit-release-forbidden", "PyTorchJob team-a/dat-smoke (release): forbidden by RBAC: "),
    ("submit-suspend-dropped", "PyTorchJob team-a/dat-smoke: the cluster dropped spec.runPolicy.suspend (a "
                               "PyTorchJob CRD older than the one datctl is written for), so the job could start "
                               "before its objects exist; install the Kubeflow training operator v1.9"),
])
def test_a_job_that_cannot_be_held_or_released_is_deleted(scenario: str, message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, scenario, tmp_path, "submit", SMOKE)
    assert code == 1 and without_warnings(err).startswith(f"datctl: {message}")
    assert len(without_warnings(err).splitlines()) == 1
    assert (server.requests[-1]["method"], server.requests[-1]["path"]) == ("DELETE", JOBS + "/dat-smoke")


def test_a_trainjob_comes_with_a_serviceaccount_that_mounts_no_token(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A TrainJob cannot turn the API token off per pod: its pods run as <name>-trainer, created with the
    job and owned by it, whose automountServiceAccountToken is false."""
    code, out, err, server = datctl(capsys, "submit-trainjob", tmp_path, "submit", SMOKE, "--api", "trainjob")
    assert code == 0, err
    assert out.splitlines()[:5] == ["trainjob/dat-smoke created (suspended until its objects exist)",
                                    "serviceaccount/dat-smoke-trainer created", "configmap/dat-smoke-config created",
                                    "podmonitor/dat-smoke created", "trainjob/dat-smoke released"]
    objects = rendered(api="trainjob")
    dry_run, job, account = server.requests[3], server.requests[5]["body"], server.requests[6]["body"]
    assert job == held(objects["TrainJob"], ("spec",))
    assert dry_run["query"] == {"dryRun": "All"} and dry_run["body"] == objects["ServiceAccount"]
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
    pod = objects["TrainJob"]["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "dat-smoke-trainer"
    (release,) = [r for r in server.requests if r["method"] == "PATCH"]
    assert release["path"].endswith("/trainjobs/dat-smoke")
    assert release["body"] == {"metadata": {"annotations": {"kueue.x-k8s.io/admission-gated-by": None}},
                               "spec": {"suspend": False}}


def test_a_failed_trainjob_submit_deletes_the_trainjob_that_owns_its_serviceaccount(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-trainjob-rollback", tmp_path, "submit", SMOKE, "--api", "trainjob")
    assert code == 1 and "etcdserver: request timed out" in err
    account = next(r for r in server.requests if r["path"].endswith("/serviceaccounts") and not r["query"])
    assert account["body"]["metadata"]["ownerReferences"][0]["uid"] == "7c2e9a41-6b3d-4f18-a5e0-1d9c8b7a6f52"
    assert [(r["method"], r["path"].rsplit("/", 2)[-2:]) for r in server.requests[-1:]] == [
        ("DELETE", ["trainjobs", "dat-smoke"])]


def test_a_serviceaccount_rbac_forbids_is_reported_before_anything_is_created(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "submit-trainjob-sa-forbidden", tmp_path, "submit", SMOKE,
                                    "--api", "trainjob")
    assert code == 1 and out == ""
    line = without_warnings(err).strip()
    assert line.startswith("datctl: ServiceAccount team-a/dat-smoke-trainer (dry run): forbidden by RBAC: ")
    assert line.endswith("set serviceAccountName in the spec to an existing ServiceAccount (one without a token: "
                         "automountServiceAccountToken: false)")
    assert all(r["query"] == {"dryRun": "All"} for r in server.requests if r["method"] == "POST")


def test_status_of_a_running_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "status-running", tmp_path, "status", "dat-smoke")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "PyTorchJob team-a/dat-smoke: Running"
    assert any(line.split()[:2] == ["Running", "True"] for line in lines)
    assert "  Master  active 1, succeeded 0, failed 0" in lines
    worker = next(line for line in lines if line.split()[:1] == ["dat-smoke-worker-0"])
    assert worker.split()[:4] == ["dat-smoke-worker-0", "Running", "restarts", "1"]
    assert worker.endswith("  last exit 200: lost contact with another rank")
    assert "exit" not in next(line for line in lines if line.split()[:1] == ["dat-smoke-master-0"])
    figures = {line.split()[0]: float(line.split()[1]) for line in lines[lines.index(
        "latest epoch (dat-smoke-master-0:9400/metrics):") + 1:]}
    # rank 0's gauges only; counters and the info metric left out
    assert figures == {"dat_epoch": 1.0, "dat_epoch_duration_seconds": 41.7, "dat_test_robust_accuracy": 0.1875,
                       "dat_test_clean_accuracy": 0.3125, "dat_images_per_second": 6.14}
    assert server.requests[1]["query"] == {"labelSelector": "training.kubeflow.org/job-name=dat-smoke"}



def test_status_of_a_failed_job_says_why_its_pod_exited(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, "status-failed", tmp_path, "status", "dat-smoke")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "PyTorchJob team-a/dat-smoke: Failed"
    master = next(line for line in lines if line.split()[:1] == ["dat-smoke-master-0"])
    assert master.split()[:4] == ["dat-smoke-master-0", "Failed", "restarts", "0"]
    assert master.endswith("  exited 2: a mistake in the config, data or checkpoint, or diverged or out of memory: "
                           "its log says which")
    assert not any("latest epoch" in line for line in lines)  # no running master to ask
    assert len(server.requests) == 2

@pytest.mark.parametrize("scenario, api", [("status-trainjob", ["--api", "trainjob"]),
                                           # without --api: no PyTorchJob CRD (a Trainer v2 cluster), so the TrainJob
                                           ("status-trainjob-found", [])])
def test_status_of_a_trainjob(scenario: str, api: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, server = datctl(capsys, scenario, tmp_path, "status", "dat-smoke", *api)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "TrainJob team-a/dat-smoke: Created"
    assert "  node    active 2, ready 2, succeeded 0, failed 0, suspended 0" in lines
    assert any(line.split()[:4] == ["dat-smoke-node-0-1-7x1kq", "Running", "restarts", "1"] for line in lines)
    pods = next(r for r in server.requests if r["path"].endswith("/pods"))
    assert pods["query"] == {"labelSelector": "jobset.sigs.k8s.io/jobset-name=dat-smoke"}
    # a TrainJob's pods declare no ports: metrics.port comes from the job's trainer config (its ConfigMap)
    start = lines.index("latest epoch (dat-smoke-node-0-0-7x0kq:9400/metrics):")
    assert {line.split()[0]: float(line.split()[1]) for line in lines[start + 1:]}["dat_epoch"] == 1.0


@pytest.mark.parametrize("scenario, message", [
    ("status-not-found", "datctl: no PyTorchJob or TrainJob named dat-smoke in namespace team-a\n"),
    ("status-crd-missing", "datctl: neither the PyTorchJob CRD (kubeflow.org/v1) nor the TrainJob CRD "
                           "(trainer.kubeflow.org/v1alpha1) is installed in the cluster;"),
    ("status-forbidden", 'datctl: PyTorchJob team-a/dat-smoke: forbidden by RBAC: pytorchjobs.kubeflow.org '
                         '"dat-smoke" is forbidden: User "alice@example.com" cannot get resource "pytorchjobs"'),
])
def test_status_errors(scenario: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err, _ = datctl(capsys, scenario, tmp_path, "status", "dat-smoke")
    assert code == 1 and out == "" and err.startswith(message) and len(err.splitlines()) == 1
    if scenario == "status-forbidden":  # a user allowed TrainJobs only would have found one: it was looked for
        assert err.rstrip().endswith("(nor is there a TrainJob dat-smoke)"), err


def test_watch_until_failed(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller import kube
    pauses: list[float] = []
    monkeypatch.setattr(kube.time, "sleep", pauses.append)
    code, out, _, _ = datctl(capsys, "watch-failed", tmp_path, "watch", "dat-smoke", "--interval", "1")
    assert code == 1 and pauses == [1.0, 1.0]  # between the three polls
    assert out.splitlines() == [
        "2026-11-27T09:14:02Z Created=True PyTorchJobCreated PyTorchJob dat-smoke is created.",
        "2026-11-27T09:14:31Z Running=True PyTorchJobRunning PyTorchJob team-a/dat-smoke is running.",
        "2026-11-27T09:16:05Z Running=False",
        "2026-11-27T09:16:05Z Failed=True PyTorchJobFailed PyTorchJob team-a/dat-smoke has failed because 1 "
        "Master replica(s) failed.",
        "PyTorchJob team-a/dat-smoke: failed",
    ]


def test_watch_until_succeeded(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller import kube
    monkeypatch.setattr(kube.time, "sleep", lambda seconds: None)
    code, out, _, _ = datctl(capsys, "watch-succeeded", tmp_path, "watch", "dat-smoke", "--interval", "1")
    assert code == 0 and out.splitlines()[-1] == "PyTorchJob team-a/dat-smoke: succeeded"
    assert sum("Created=True" in line for line in out.splitlines()) == 1  # each transition printed once


def test_watch_gives_up_after_timeout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with ReplayServer("status-running") as server:
        config = kubeconfig(tmp_path / "kubeconfig", server.url)
        code = cli.main(["watch", "dat-smoke", "--timeout", "0.001", "--interval", "1", "--kubeconfig", str(config)])
    assert code == 1 and "still Running after 0.001s" in capsys.readouterr().err


def test_logs_of_the_master(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _, server = datctl(capsys, "logs", tmp_path, "logs", "dat-smoke")
    assert code == 0 and out.startswith("[rank 0] epoch 1/2") and out.count("\n") == 2
    assert server.requests[1]["query"]["labelSelector"] == (
        "training.kubeflow.org/job-name=dat-smoke,training.kubeflow.org/replica-type=master,"
        "training.kubeflow.org/replica-index=0")


def test_delete_waits_until_the_job_and_its_configmap_are_gone(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As kubectl delete waits: a submit of the same name right after would find the ConfigMap (409)."""
    from controller import kube
    slept: list[float] = []
    monkeypatch.setattr(kube.time, "sleep", slept.append)
    code, out, _, server = datctl(capsys, "delete", tmp_path, "delete", "dat-smoke")
    assert code == 0 and out.startswith("pytorchjob/dat-smoke deleted")
    request = server.requests[0]
    assert (request["body"] or {}).get("propagationPolicy", request["query"].get("propagationPolicy")) == "Background"
    assert [r["path"].rsplit("/", 2)[-2] for r in server.requests[1:]] == [
        "pytorchjobs", "pytorchjobs", "configmaps", "pytorchjobs", "configmaps"]  # polled until both were gone
    assert slept == [1.0, 1.0]


def test_delete_that_times_out_waiting_says_what_is_left(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with ReplayServer("delete") as server:
        config = kubeconfig(tmp_path / "kubeconfig", server.url)
        code = cli.main(["delete", "dat-smoke", "--timeout", "0", "--kubeconfig", str(config)])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and len(server.requests) == 2
    assert err == ("datctl: PyTorchJob team-a/dat-smoke or its ConfigMap is still there after 0 s (a finalizer? "
                   "kubectl get pytorchjobs,configmaps -n team-a); a submit of the same name waits for them to go\n")


def test_unreachable_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_port()  # nobody listens on it
    config = kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    code = cli.main(["status", "dat-smoke", "--kubeconfig", str(config)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"datctl: cannot reach the Kubernetes API server at http://127.0.0.1:{port}")
    assert len(err.splitlines()) == 1


def test_a_server_that_never_answers_times_out_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """It accepts the connection and says nothing (a hung API server, a black-holing proxy)."""
    import socket
    import time
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        config = kubeconfig(tmp_path / "kubeconfig", url)
        for argv in (["status", "dat-smoke"], ["delete", "dat-smoke"], ["watch", "dat-smoke", "--timeout", "5"]):
            started = time.monotonic()
            code = cli.main([*argv, "--kubeconfig", str(config), "--request-timeout", "1"])
            err = capsys.readouterr().err
            assert code == 1 and f"the Kubernetes API server at {url} did not answer within 1 s" in err, err
            assert len(err.splitlines()) == 1 and time.monotonic() - started < 30


def test_a_server_that_is_not_kubernetes_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An HTML page where the API should be (an auth proxy's login page, a wrong server URL)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html>sign in</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{server.server_address[1]}")
        code = cli.main(["status", "dat-smoke", "--kubeconfig", str(config)])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == 1 and "did not answer as a Kubernetes API server (not JSON)" in err and len(err.splitlines()) == 1


def test_a_missing_auth_plugin_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Not "the API server rejected the kubeconfig credentials": none were ever sent."""
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gke",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "me", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                   "command": "/nonexistent/gke-gcloud-auth-plugin"}}}],
        "contexts": [{"name": "gke", "context": {"cluster": "c", "user": "me"}}]}))
    code = cli.main(["status", "dat-smoke", "--kubeconfig", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "kubeconfig user 'me' signs in with the exec plugin '/nonexistent/gke-gcloud-auth-plugin', which is " \
           "not installed" in err


def test_no_kubeconfig(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    code = cli.main(["status", "dat-smoke"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("datctl: no usable Kubernetes config") and len(err.splitlines()) == 1


def test_recorded_jobs_match_the_crd() -> None:
    """The recorded answers are in the API server's format: every PyTorchJob and TrainJob in them passes the
    real CRD."""
    checked = 0
    for path in sorted((Path(__file__).parent / "recorded").glob("*.json")):
        for exchange in yaml.safe_load(path.read_text())["exchanges"]:
            body = exchange["response"].get("body")
            if isinstance(body, dict) and body.get("kind") in ("PyTorchJob", "TrainJob"):
                try:
                    assert schemas.crd_problems(body) == [], path.name
                except schemas.SchemaMissing as exc:
                    pytest.fail(str(exc))
                checked += 1
    assert checked >= 9


CLUSTER_COMMANDS = [["submit", SMOKE], ["status", "dat-smoke"], ["watch", "dat-smoke"], ["logs", "dat-smoke"],
                    ["delete", "dat-smoke"]]


@pytest.mark.parametrize("command", CLUSTER_COMMANDS, ids=lambda c: c[0])
def test_kubeconfig_mistakes_are_one_line(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A broken kubeconfig, a --kubeconfig that does not exist and an unknown --context: exit 2, one line that
    says which (the kubernetes client gives a YAML traceback, or "set KUBECONFIG or pass --kubeconfig")."""
    broken = tmp_path / "broken"
    broken.write_text("garbage: [\n")
    good = kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    for flags, line in [
        (["--kubeconfig", str(broken)], f"datctl: kubeconfig {broken}: not valid YAML (line 2, column 1): "),
        (["--kubeconfig", str(tmp_path / "missing")], f"datctl: --kubeconfig {tmp_path / 'missing'}: the file "
                                                      "does not exist"),
        (["--kubeconfig", str(good), "--context", "nope"], f"datctl: context 'nope' not in kubeconfig {good} "
                                                          "(contexts: replay)"),
    ]:
        code = cli.main([*command, *flags])
        err = capsys.readouterr().err
        errors = without_warnings(err).splitlines()
        assert code == 2 and len(errors) == 1 and errors[0].startswith(line), err


def test_broken_kubeconfig_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken"
    broken.write_text("- just a list\n")
    monkeypatch.setenv("KUBECONFIG", str(broken))
    assert cli.main(["status", "dat-smoke"]) == 2
    assert capsys.readouterr().err == f"datctl: kubeconfig {broken}: not a kubeconfig (a mapping with clusters, " \
                                      "users and contexts), got list\n"


def test_epoch_figures_wait_for_the_first_epoch_and_show_times_as_dates() -> None:
    from controller.kube import epoch_figures
    labels = 'job_name="j",local_rank="0",node_rank="0",rank="0"'
    starting = (f"# TYPE dat_epoch gauge\ndat_epoch{{{labels}}} 0.0\n"
                f"# TYPE dat_progress_timestamp_seconds gauge\ndat_progress_timestamp_seconds{{{labels}}} 1.8e9\n")
    assert epoch_figures(starting) == []  # status prints "(no epoch finished yet)"
    lines = epoch_figures(starting.replace("} 0.0", "} 2.0"))
    assert lines[0].split() == ["dat_epoch", "2"]
    assert lines[1].split()[1:] == ["2027-01-15", "08:00:00", "UTC"]


def test_an_object_the_kubernetes_client_refuses_is_one_line(tmp_path: Path) -> None:
    """The client checks core objects itself (pydantic) before sending them: a typo there (e.g. in a
    NetworkPolicy the chart's schema let through) is a ClusterError line, not a traceback."""
    from controller import kube
    cluster = kube.Cluster(kubeconfig=str(kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")),
                           namespace="team-a")
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "dat-smoke"},
              "spec": {"podSelector": {}, "egress": [{"tox": []}]}}
    with pytest.raises(kube.ClusterError) as caught:
        cluster._create(policy, dry_run="All")
    text = str(caught.value)
    assert text.startswith("NetworkPolicy team-a/dat-smoke (dry run): the kubernetes client refused it: ")
    assert "tox" in text and "\n" not in text
