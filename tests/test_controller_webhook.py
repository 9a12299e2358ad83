"""`datctl validate`: the training operator's admission rules and the pending-pod mistakes, one test each, on
the committed smoke manifest with one thing broken."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import yaml

from controller import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [d for d in yaml.safe_load_all((ROOT / "manifests" / "dat-smoke.yaml").read_text()) if d]
JOB = next(d for d in DOCS if d["kind"] == "PyTorchJob")


def master(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]


def container(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


def validate(capsys: pytest.CaptureFixture, tmp_path: Path, job: dict, *flags: str) -> tuple[int, list[str]]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([d if d["kind"] != "PyTorchJob" else job for d in DOCS]))
    code = cli.main(["validate", str(path), *flags])
    out, err = capsys.readouterr()
    return code, err.splitlines() if code else out.splitlines()


def set_gpus(job: dict, gpus: str) -> None:
    for replica in job["spec"]["pytorchReplicaSpecs"]:
        container(job, replica)["resources"]["limits"]["nvidia.com/gpu"] = gpus


def elastic(job: dict) -> None:
    job["spec"]["elasticPolicy"] = {"rdzvBackend": "c10d", "minReplicas": 1, "maxReplicas": 2}


def rename(job: dict, name: str) -> None:
    job["metadata"]["name"] = name


def remove_shm(job: dict) -> None:
    c = container(job)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/dev/shm"]


def shm_on_disk(job: dict) -> None:
    for v in master(job)["template"]["spec"]["volumes"]:
        if v["name"] == "dshm":
            v["emptyDir"].pop("medium")


# (how to break the job, the line `datctl validate` must print after "<file>: PyTorchJob <name>: ")
BREAKS: dict[str, tuple[Callable[[dict], None], str]] = {
    "name-not-dns1035": (lambda j: rename(j, "1-dat"),
                         "metadata.name: '1-dat' must be a DNS-1035 label"),
    "name-uppercase": (lambda j: rename(j, "DAT"), "metadata.name: 'DAT' must be a DNS-1035 label"),
    "pod-name-too-long": (lambda j: (rename(j, "d" * 54), j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=11)),
                          f"metadata.name: pod name '{'d' * 54}-worker-10' has 64 characters (max 63)"),
    "name-not-a-string": (lambda j: rename(j, True), "metadata.name: must be a string, got True"),
    "elastic-not-a-mapping": (lambda j: j["spec"].update(elasticPolicy=["c10d"]),
                              "spec.elasticPolicy: must be a mapping"),
    "containers-not-a-list": (lambda j: master(j)["template"]["spec"].update(containers="pytorch"),
                              "spec.pytorchReplicaSpecs.Master.template.spec.containers: must be a list, got str"),
    "max-replicas-not-an-integer": (lambda j: j["spec"].update(elasticPolicy={"maxReplicas": "x"}),
                                    "spec.elasticPolicy.maxReplicas: must be an integer, got 'x'"),
    "template-not-a-mapping": (lambda j: master(j).update(template="pod"),
                               "spec.pytorchReplicaSpecs.Master: must be a mapping with a template mapping"),
    "restart-policy-unknown": (lambda j: master(j).update(restartPolicy="Sometimes"),
                               "spec.pytorchReplicaSpecs.Master.restartPolicy: 'Sometimes' is not one of Always, "
                               "OnFailure, Never, ExitCode"),
    "two-masters": (lambda j: master(j).update(replicas=2),
                    "spec.pytorchReplicaSpecs.Master.replicas: must be 1, got 2"),
    "no-master": (lambda j: j["spec"]["pytorchReplicaSpecs"].pop("Master"),
                  "spec.pytorchReplicaSpecs.Master: required (exactly one Master hosts the rendezvous)"),
    "replicas-not-a-number": (lambda j: master(j).update(replicas="one"),
                              "spec.pytorchReplicaSpecs.Master.replicas: must be an integer, got 'one'"),
    "zero-workers": (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0),
                     "spec.pytorchReplicaSpecs.Worker.replicas: must be at least 1, got 0"),
    "elastic-without-worker": (lambda j: (elastic(j), j["spec"]["pytorchReplicaSpecs"].pop("Worker")),
                               "spec.pytorchReplicaSpecs.Worker: must be configured if elastic policy is used"),
    "elastic-nproc-twice": (lambda j: (elastic(j), j["spec"]["elasticPolicy"].update(nProcPerNode=1)),
                            "spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode"),
    "unknown-replica-type": (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=copy.deepcopy(master(j))),
                             "spec.pytorchReplicaSpecs.Chief: unknown replica type (supported: Master, Worker)"),
    "no-replica-specs": (lambda j: j["spec"].update(pytorchReplicaSpecs={}),
                         "spec.pytorchReplicaSpecs: must be specified"),
    "container-not-pytorch": (lambda j: container(j).update(name="trainer"),
                              "spec.pytorchReplicaSpecs.Master.template.spec.containers: needs a container named "
                              "'pytorch' (found: trainer)"),
    "no-image": (lambda j: container(j).pop("image"),
                 "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].image: required"),
    "no-containers": (lambda j: master(j)["template"]["spec"].update(containers=[]),
                      "spec.pytorchReplicaSpecs.Master.template.spec.containers: must be specified"),
    "no-shm": (remove_shm, "spec.pytorchReplicaSpecs.Master: container pytorch has no memory-backed /dev/shm"),
    "shm-on-disk": (shm_on_disk, "spec.pytorchReplicaSpecs.Master: container pytorch has no memory-backed /dev/shm"),
    "gpus-vs-processes": (lambda j: container(j)["resources"]["limits"].update({"nvidia.com/gpu": "2"}),
                          "spec.pytorchReplicaSpecs.Master: 2 GPU(s) per pod but spec.nprocPerNode is 1"),
    "bad-pod-type": (lambda j: container(j)["ports"][0].update(containerPort="twenty"),
                     "spec.pytorchReplicaSpecs.Master.template: not a valid pod template: V1ContainerPort "
                     "containerPort: Input should be a valid integer"),
}


def test_the_committed_job_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, lines = validate(capsys, tmp_path, JOB)
    assert code == 0 and lines == ["ok: 1 PyTorchJob(s) in 1 file(s)"]


def test_numbers_as_quantities_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The API takes numbers for quantities; the client's models want strings: that is not a problem."""
    job = copy.deepcopy(JOB)
    set_gpus(job, "1")
    for replica in job["spec"]["pytorchReplicaSpecs"]:
        container(job, replica)["resources"] = {"requests": {"cpu": 2}, "limits": {"memory": "2Gi", "nvidia.com/gpu": 1}}
    assert validate(capsys, tmp_path, job)[0] == 0


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_each_rule(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    breaker, line = BREAKS[case]
    job = copy.deepcopy(JOB)
    breaker(job)
    code, lines = validate(capsys, tmp_path, job)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"datctl: {tmp_path / 'job.yaml'}: PyTorchJob {job['metadata']['name']}: ")
    assert line in lines[0], lines[0]


def test_crd_schemas_on_request(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    job = copy.deepcopy(JOB)
    job["spec"]["nprocsPerNode"] = "1"  # a typo the operator rules cannot see
    assert validate(capsys, tmp_path, job)[0] == 0
    code, lines = validate(capsys, tmp_path, job, "--schemas")
    assert code == 2 and lines == [f"datctl: {tmp_path / 'job.yaml'}: PyTorchJob dat-smoke: spec: Additional "
                                   "properties are not allowed ('nprocsPerNode' was unexpected)"]
    monkeypatch.setenv("DAT_SCHEMA_DIR", str(tmp_path / "missing"))
    code, lines = validate(capsys, tmp_path, JOB, "--schemas")
    assert code == 2 and "kubeflow.org_pytorchjobs.yaml not found" in lines[0]


def test_unreadable_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [PyTorchJob\n")
    assert cli.main(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: cannot read: " in capsys.readouterr().err
