"""`datctl render` on job specs: every user mistake is one line on stderr and exit code 2, never a traceback;
overrides, trainerConfigFile and namespaces do what they say."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller import cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "manifests" / "specs" / "dat-smoke.yaml").read_text())


DELETE = object()


def write_spec(tmp_path: Path, changes: dict | None = None, text: str | None = None) -> Path:
    """The smoke spec with changes {"a/b/c": value} ('~' for a '/' inside a key; DELETE removes the key)."""
    doc = yaml.safe_load(yaml.safe_dump(SMOKE))
    for path, value in (changes or {}).items():
        *parents, last = [k.replace("~", "/") for k in path.split("/")]
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(doc))
    return path


def render(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# (changes to the smoke spec, the one line datctl must print)
MISTAKES = {
    "unknown-key": ({"nodez": 3}, "nodez: unknown key (known: "),
    "image-upper-case": ({"image/repository": "registry.example.com/Team/Foo"},
                         "image.repository: 'registry.example.com/Team/Foo' is invalid: an image repository"),
    "image-tag-space": ({"image/tag": "a b"}, "image.tag: 'a b' is invalid: an image tag"),
    "extra-mount-clash": ({"extraVolumes": [{"name": "ib", "emptyDir": {}}],
                           "extraVolumeMounts": [{"name": "ib", "mountPath": "/tmp/x"}]},
                          "extraVolumeMounts[0].mountPath: /tmp/x collides with the pod's /tmp mount"),
    "extra-mount-relative": ({"extraVolumeMounts": [{"name": "ib", "mountPath": "dev/ib"}]},
                             "extraVolumeMounts.0.mountPath: "),
    "unknown-nested-key": ({"data/sorce": "pvc"}, "data.sorce: unknown key (known: claimName, downloadSizeLimit,"),
    "bad-quantity": ({"resources/limits/memory": "10Gb"},
                     "resources.limits.memory: '10Gb' is not a valid quantity (e.g. 500m, 2, 16Gi)"),
    "bad-shm-quantity": ({"shm/sizeLimit": "a lot"}, "shm.sizeLimit: 'a lot' is not a valid quantity"),
    "bad-tmp-quantity": ({"tmp/sizeLimit": "1e1.5"}, "tmp.sizeLimit: '1e1.5' is not a valid quantity"),
    "unparsable-quantity": ({"resources/limits/memory": "1e1.5"},
                            "resources.limits.memory: '1e1.5' is not a valid quantity"),
    "wrong-type": ({"nodes": "two"}, "nodes: expected integer, got 'two'"),
    "below-minimum": ({"nodes": 0}, "nodes: must be >= 1, got 0"),
    "root-user": ({"securityContext/runAsUser": 0}, "securityContext.runAsUser: must be >= 1, got 0"),
    "bad-enum": ({"api": "tfjob"}, "api: 'tfjob' is not one of pytorchjob, trainjob"),
    "bad-restart-policy": ({"restartPolicy": "Sometimes"}, "restartPolicy: 'Sometimes' is not one of OnFailure"),
    "name-not-dns1035": ({"name": "Dat_Smoke"}, "name: 'Dat_Smoke' is invalid: DNS-1035 label"),
    "name-missing": ({"name": DELETE}, "name: required (the job name; pods are <name>-master-0"),
    "name-too-long-for-release": ({"name": "a" * 54}, "the job name is also the Helm release name, which helm "
                                                      "limits to 53"),
    "name-too-long-for-pods": ({"name": "a" * 53, "nodes": 1001, "trainer/data/batch_size": 1001,
                                "trainer/data/synthetic_train_size": 1001},
                               f"pod name '{'a' * 53}-worker-999' has 64 characters (max 63)"),
    "gpus-vs-processes": ({"gpusPerNode": 1, "nprocPerNode": 2},
                          "nprocPerNode: 2 does not match gpusPerNode 1 (each torchrun process needs its own GPU)"),
    "gpus-in-resources": ({"resources/limits/nvidia.com~gpu": "1"},
                          "resources.limits.nvidia.com/gpu: set GPUs with gpusPerNode, not in resources"),
    "requests-over-limits": ({"resources/requests/memory": "4Gi", "resources/limits/memory": "2Gi"},
                             "resources.requests.memory: 4Gi exceeds resources.limits.memory 2Gi"),
    "shm-over-memory": ({"shm/sizeLimit": "2Gi"},
                        "shm.sizeLimit: 2Gi must be below resources.limits.memory 1536Mi"),
    "pvc-without-claim": ({"data/source": "pvc"}, "data.claimName: required when data.source is pvc"),
    "cifar-without-data": ({"trainer/data/name": "cifar10"},
                           "data.source: trainer data.name cifar10 needs a data volume (pvc or download)"),
    "cifar-ext-download": ({"trainer/data/name": "cifar10-ext", "data/source": "download"},
                           "data.source: download fetches CIFAR-10 only; cifar10-ext needs the TI-500K pickle"),
    "ti500k-off-volume": ({"trainer/data/name": "cifar10-ext", "data/source": "pvc", "data/claimName": "d",
                           "trainer/data/ti500k_path": "ti.pickle"},
                          "trainer.data.ti500k_path: 'ti.pickle' is not on the data volume"),
    "trainjob-download": ({"api": "trainjob", "data/source": "download", "trainer/data/name": "cifar10"},
                          "data.source: download needs an init container, which api trainjob cannot add"),
    "trainjob-elastic": ({"api": "trainjob", "elastic/enabled": True, "elastic/minNodes": 2, "elastic/maxNodes": 2},
                         "elastic.enabled: not supported with api trainjob"),
    "trainjob-volcano": ({"api": "trainjob", "scheduling/volcano/enabled": True},
                         "scheduling.volcano.enabled: not supported with api trainjob"),
    "elastic-bounds": ({"elastic/enabled": True, "elastic/minNodes": 4, "elastic/maxNodes": 4},
                       "elastic: nodes 2 is outside minNodes..maxNodes (4..4)"),
    "kueue-and-volcano": ({"scheduling/kueueQueue": "q", "scheduling/volcano/enabled": True},
                          "scheduling: kueueQueue and volcano.enabled cannot be combined"),
    "gang-too-big": ({"scheduling/volcano/enabled": True, "scheduling/volcano/minAvailable": 3},
                     "scheduling.volcano.minAvailable: 3 exceeds the 2 pods the job creates"),
    "elastic-gang-too-big": ({"scheduling/volcano/enabled": True, "scheduling/volcano/minAvailable": 3,
                              "elastic/enabled": True, "elastic/minNodes": 1, "elastic/maxNodes": 4,
                              "trainer/data/batch_size": 12},
                             "scheduling.volcano.minAvailable: 3 exceeds the 2 pods the job creates"),
    "whole-float-nodes": ({"nodes": 3.0}, "nodes: expected integer, got 3.0"),
    "affinity-typo": ({"nodePool/affinity": {"nodeAffinty": {}}},
                      "nodePool.affinity: the PyTorchJob CRD refuses it: spec.pytorchReplicaSpecs.*.template.spec."
                      "affinity: Additional properties are not allowed ('nodeAffinty' was unexpected)"),
    # the API server would drop the unknown field: a volume without a source is an emptyDir, no InfiniBand
    "volume-typo": ({"extraVolumes": [{"name": "ib", "hostpath": {"path": "/dev/infiniband"}}],
                     "extraVolumeMounts": [{"name": "ib", "mountPath": "/dev/infiniband"}]},
                    "extraVolumes: the PyTorchJob CRD refuses it: spec.pytorchReplicaSpecs.*.template.spec.volumes.4: "
                    "Additional properties are not allowed ('hostpath' was unexpected)"),
    "env-typo": ({"extraEnv": [{"name": "TOKEN", "valueFrom": {"secretKeyRefx": {}}}]},
                 "extraEnv: the PyTorchJob CRD refuses it: spec.pytorchReplicaSpecs.*.template.spec.containers.0.env."),
    "env-typo-in-trainjob": ({"api": "trainjob", "extraEnv": [{"name": "X", "valueFrom": {"fieldRefx": {}}}]},
                                    "extraEnv: the TrainJob CRD refuses it: spec.trainer.env."),
    "accelerator-without-gpus": ({"nodePool/provider": "gke", "nodePool/accelerator": "nvidia-l4"},
                                 "nodePool.accelerator: 'nvidia-l4' with gpusPerNode 0 would place CPU-only pods"),
    "nccl-without-gpus": ({"trainer/dist/backend": "nccl"}, "trainer.dist.backend: nccl needs GPUs and gpusPerNode"),
    "chart-label-in-pod-labels": ({"podLabels/app.kubernetes.io~component": "x", "podLabels/app.kubernetes.io~part-of": "ml"},
                                  "podLabels.app.kubernetes.io/component: set by the chart"),
    "bad-label-value": ({"podLabels/team": "ml team"}, "podLabels.team: 'ml team' is invalid: a label value"),
    "bad-kueue-queue": ({"scheduling/kueueQueue": "my queue!"},
                        "scheduling.kueueQueue: 'my queue!' is invalid: the Kueue LocalQueue (a label value)"),
    "bad-service-account": ({"serviceAccountName": "Bad_SA"},
                            "serviceAccountName: 'Bad_SA' is invalid: a ServiceAccount name"),
    "bad-resource-name": ({"resources/requests/foo": "1"}, "resources.requests: 'foo' does not match"),
    "mount-path-quote": ({"checkpoint/mountPath": '/ckpt"x'}, "checkpoint.mountPath: '/ckpt\"x' is invalid"),
    "bad-claim-name": ({"checkpoint/claimName": "a: b"}, "checkpoint.claimName: 'a: b' is invalid: a PersistentVol"),
    "mount-collision": ({"checkpoint/mountPath": "/tmp/ckpt"},
                        "checkpoint.mountPath: /tmp/ckpt collides with the pod's /tmp mount"),
    "mount-twice": ({"data/source": "download", "trainer/data/name": "cifar10", "data/mountPath": "/checkpoints"},
                    "data.mountPath: /checkpoints is also checkpoint.mountPath"),
    "metrics-port-taken": ({"metrics/port": 23456}, "metrics.port: 23456 is taken by the operator"),
    "trainer-unknown-key": ({"trainer/optim/lrr": 0.1}, "trainer: config: unknown key optim.lrr (known:"),
    "trainer-bad-value": ({"trainer/attack/steps": 0}, "trainer: attack.steps must be >= 1, got 0"),
    "trainer-batch-vs-world": ({"nodes": 3}, "trainer: data.batch_size 64 is not divisible by the world size 3"),
    "trainer-and-file": ({"trainerConfigFile": "other.yaml"},
                         "trainerConfigFile: set either trainer or trainerConfigFile, not both"),
    "trainer-file-missing": ({"trainer": DELETE, "trainerConfigFile": "missing.yaml"},
                             "trainerConfigFile: missing.yaml: file not found"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_each_mistake_is_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    changes, line = MISTAKES[case]
    path = write_spec(tmp_path, changes)
    code, out, err = render(capsys, str(path))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("datctl: ") and line in lines[0], err


def test_the_limits_themselves_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_spec(tmp_path, {"scheduling/volcano/enabled": True, "scheduling/volcano/minAvailable": 2,  # every pod
                                 "shm/sizeLimit": "1535Mi"})  # just below resources.limits.memory 1536Mi
    code, out, err = render(capsys, str(path))
    assert code == 0 and "minAvailable" not in err and "shm" not in err, err
    job = next(doc for doc in yaml.safe_load_all(out) if doc["kind"] == "PyTorchJob")
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
    volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1535Mi"}} in volumes

def test_trainer_settings_where_the_spec_belongs_say_where_they_go(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A trainer config passed as a values file (-f) or pasted at the top of the spec."""
    code, out, err = render(capsys, str(write_spec(tmp_path, {"optim": {"lr": 0.1}, "data/batch_size": 64})))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err
    for line, path in zip(lines, ("optim", "data.batch_size")):
        assert line.startswith(f"datctl: {path}: unknown key (known: ")
        assert line.endswith(f"; a trainer setting: trainer.{path} in the spec, or name a trainer config file in "
                             "trainerConfigFile")
    code, _, err = render(capsys, str(write_spec(tmp_path, {"nodez": 3})))
    assert code == 2 and "a trainer setting" not in err

def test_a_number_as_a_key_is_checked_as_helm_sees_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """YAML reads `1:` as a number; helm (JSON) sees the key "1", which is no variable name: datctl says so in
    its own words instead of passing on helm's schema dump."""
    path = write_spec(tmp_path, {"env": {1: "x"}})
    assert "\n  1: x\n" in path.read_text()
    code, out, err = render(capsys, str(path))
    assert code == 2 and out == ""
    assert err.splitlines() == ["datctl: env: '1' is invalid: an environment variable name: letters, digits, '_', "
                                "'.', '-', not starting with a digit"], err


def test_every_problem_gets_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_spec(tmp_path, {"nodez": 1, "gpuz": 1, "resources/limits/cpu": "two", "api": "mpijob"})
    code, _, err = render(capsys, str(path))
    assert code == 2
    assert sorted(err.splitlines()) == sorted([
        "datctl: api: 'mpijob' is not one of pytorchjob, trainjob",
        "datctl: gpuz: unknown key (known: " + err.split("gpuz: unknown key (known: ")[1].split(")")[0] + ")",
        "datctl: nodez: unknown key (known: " + err.split("nodez: unknown key (known: ")[1].split(")")[0] + ")",
        "datctl: resources.limits.cpu: 'two' is not a valid quantity (e.g. 500m, 2, 16Gi)",
    ])
    # the rules that need well-typed values report together too
    path = write_spec(tmp_path, {"gpusPerNode": 1, "nprocPerNode": 2, "metrics/port": 29400,
                                 "trainer/attack/steps": 0})
    code, _, err = render(capsys, str(path))
    assert code == 2 and len(err.splitlines()) == 3, err
    # schema problems elsewhere in the spec do not hide the trainer's (one round, not two)
    path = write_spec(tmp_path, {"typoKey": 1, "resources/limits/cpu": "3x", "trainer/optim/lr": -1,
                                 "trainer/data/batch_size": 33})
    code, _, err = render(capsys, str(path))
    assert code == 2 and len(err.splitlines()) == 4, err
    assert "typoKey: unknown key" in err and "'3x' is not a valid quantity" in err
    assert "trainer: optim.lr must be > 0" in err and "data.batch_size 33 is not divisible by the world size 2" in err
    # nor the cross-field rules about other parts of the spec; a rule that reads a broken value waits for it
    path = write_spec(tmp_path, {"resources/limits/memory": "lots", "shm/sizeLimit": "64Gi",
                                 "gpusPerNode": 1, "nprocPerNode": 2, "metrics/port": 29400,
                                 "checkpoint/mountPath": "/tmp/ckpt"})
    code, _, err = render(capsys, str(path))
    assert code == 2 and sorted(err.splitlines()) == sorted([
        "datctl: resources.limits.memory: 'lots' is not a valid quantity (e.g. 500m, 2, 16Gi)",
        "datctl: nprocPerNode: 2 does not match gpusPerNode 1 (each torchrun process needs its own GPU)",
        "datctl: metrics.port: 29400 is taken by the operator / torchrun rendezvous",
        "datctl: checkpoint.mountPath: /tmp/ckpt collides with the pod's /tmp mount"]), err
    # ... not even when the counts the world size comes from are broken themselves
    path = write_spec(tmp_path, {"nodes": "two", "trainer/optim/lr": -1})
    code, _, err = render(capsys, str(path))
    assert code == 2 and err.splitlines() == ["datctl: nodes: expected integer, got 'two'",
                                              "datctl: trainer: optim.lr must be > 0"], err
    # an empty elastic range is reported, and the trainer is still checked at the job's node count
    path = write_spec(tmp_path, {"elastic": {"enabled": True, "minNodes": 4, "maxNodes": 2},
                                 "trainer/optim/lr": -1})
    code, _, err = render(capsys, str(path))
    assert code == 2 and "outside minNodes..maxNodes (4..2)" in err and "trainer: optim.lr must be > 0" in err
    # a wide elastic range that fails at many world sizes: three shown, the rest counted
    path = write_spec(tmp_path, {"elastic": {"enabled": True, "minNodes": 1, "maxNodes": 40},
                                 "trainer/data/batch_size": 64})
    code, _, err = render(capsys, str(path))
    lines = err.splitlines()
    assert code == 2 and len(lines) == 4, err  # 34 of the 40 node counts do not divide 64: 3 shown + a count
    assert lines[-1] == ("datctl: trainer: ... and 31 more world sizes like: data.batch_size N is not divisible "
                         "by the world size N"), err
    # unknown trainer keys do not hide the other trainer problems
    path = write_spec(tmp_path, {"trainer/optim/nmae": "x", "trainer/optim/lr": -1})
    code, _, err = render(capsys, str(path))
    assert code == 2 and len(err.splitlines()) == 2 and "unknown key optim.nmae" in err and "optim.lr" in err, err
    # and every trainer problem gets its own line, not only the first
    path = write_spec(tmp_path, {"trainer/attack/steps": 0, "trainer/optim/lr": -1, "trainer/model/name": "vit"})
    code, _, err = render(capsys, str(path))
    assert code == 2 and sorted(err.splitlines()) == sorted([
        "datctl: trainer: model.name: 'vit' is not one of small_cnn, resnet18, preact_resnet18",
        "datctl: trainer: attack.steps must be >= 1, got 0",
        "datctl: trainer: optim.lr must be > 0"]), err


@pytest.mark.parametrize("text, line", [
    ("nodes: [1\n", "not valid YAML (line 2, column "),
    ("- nodes\n", "a job spec is a mapping of keys, got list"),
    ("nodes: 1\nname: a\nnodes: 2\n", "not valid YAML (line 3, column 1): key 'nodes' is given twice in one mapping"),
    # "billion laughs": 7 lines whose aliases expand to 9^7 values; walking it would never end
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n"
                                                   for p, n in zip("abcdef", "bcdefg")),
     "its aliases expand to more than 100,000 values"),
    ("a: &a [1, *a]\n", "an alias refers to its own anchor (a recursive structure)"),
])
def test_unreadable_spec(text: str, line: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(write_spec(tmp_path, text=text)))
    assert code == 2 and line in err and len(err.splitlines()) == 1


def test_missing_spec_and_bad_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and err.strip().endswith("nope.yaml: job spec not found")
    code, _, err = render(capsys, str(write_spec(tmp_path)), "--set", "nodes")
    assert code == 2 and "--set nodes: expected key.path=value" in err


def test_trainer_config_file_problems_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.yaml").write_text("optim: {name: adam}\n")
    path = write_spec(tmp_path, {"trainer": DELETE, "trainerConfigFile": "bad.yaml"})
    code, _, err = render(capsys, str(path))
    assert code == 2
    assert err.strip() == "datctl: trainerConfigFile bad.yaml: optim.name: 'adam' is not one of lamb, lars, sgd"


def test_no_traceback_from_the_real_command(tmp_path: Path) -> None:
    path = write_spec(tmp_path, {"gpusPerNode": 2, "nprocPerNode": 1, "resources/limits/memory": "lots"})
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "render", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("datctl: resources.limits.memory: 'lots' is not a valid quantity (e.g. 500m, 2, 16Gi)\n"
                           "datctl: nprocPerNode: 1 does not match gpusPerNode 2 (each torchrun process needs its "
                           "own GPU)\n")


def rendered_objects(capsys: pytest.CaptureFixture, *argv: str) -> dict[str, dict]:
    code, out, err = render(capsys, *argv)
    assert code == 0, err
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out)}


def test_overrides_namespace_and_trainer_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.yaml").write_text(
        "data: {name: synthetic, batch_size: 96}\noptim: {lr: 1e-3, betas: [0.8, 0.99]}\n")
    path = write_spec(tmp_path, {"trainer": DELETE, "trainerConfigFile": "configs/train.yaml"})
    objects = rendered_objects(capsys, str(path), "-n", "team-b", "--set", "nodes=3",
                               "--set", "nodePool.nodeSelector.topology\\.kubernetes\\.io/zone=europe-west4-a")
    job, cm = objects["PyTorchJob"], objects["ConfigMap"]
    assert job["metadata"]["namespace"] == cm["metadata"]["namespace"] == "team-b"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"topology.kubernetes.io/zone": "europe-west4-a"}
    config = yaml.safe_load(cm["data"]["config.yaml"])
    # the file's keys, typed as trainer/config.py reads them (PyYAML reads 1e-3 as a string)
    assert config["optim"] == {"lr": 0.001, "betas": [0.8, 0.99]}
    assert config["run"]["output_dir"] == "/checkpoints/dat-smoke" and config["metrics"]["port"] == 9400


def test_spec_namespace_and_trainjob(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_spec(tmp_path, {"namespace": "research"})
    objects = rendered_objects(capsys, str(path), "--api", "trainjob")
    assert set(objects) == {"ServiceAccount", "ConfigMap", "TrainJob", "PodMonitor"}
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"research"}
    assert objects["TrainJob"]["metadata"]["namespace"] == "research"
    assert objects["TrainJob"]["spec"]["trainer"]["numNodes"] == 2


def test_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_spec(tmp_path)
    code, out, err = render(capsys, str(path), "-o", str(tmp_path / "out"))
    assert code == 0 and out == "" and "PyTorchJob" in err
    docs = list(yaml.safe_load_all((tmp_path / "out" / "dat-smoke.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob", "PodMonitor"]  # kubectl apply order


def test_set_trainer_applies_on_top_of_the_trainer_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--set trainer.* with a trainerConfigFile spec: the file's content, then the overrides (the user never
    wrote `trainer:`, so there is no conflict)."""
    (tmp_path / "train.yaml").write_text("data: {name: synthetic, batch_size: 96}\noptim: {name: lamb, lr: 0.01}\n")
    path = write_spec(tmp_path, {"trainer": DELETE, "trainerConfigFile": "train.yaml"})
    objects = rendered_objects(capsys, str(path), "--set", "trainer.optim.name=sgd", "--set", "trainer.run.epochs=3")
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    assert config["optim"] == {"name": "sgd", "lr": 0.01}
    assert config["data"]["batch_size"] == 96 and config["run"]["epochs"] == 3
    # a bad override is reported as such, one line
    code, _, err = render(capsys, str(path), "--set", "trainer.optim.name=adam")
    assert code == 2 and err.strip() == ("datctl: trainerConfigFile train.yaml with trainer.* overrides: optim.name: "
                                         "'adam' is not one of lamb, lars, sgd")


def test_trainer_file_not_found_names_the_resolved_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "specs").mkdir()
    path = write_spec(tmp_path, {"trainer": DELETE, "trainerConfigFile": "../configs/train.yaml"})
    path = path.rename(tmp_path / "specs" / "job.yaml")
    code, _, err = render(capsys, str(path))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.strip() == (f"datctl: trainerConfigFile: ../configs/train.yaml: file not found: "
                           f"{(tmp_path / 'configs' / 'train.yaml').resolve()} (a relative path is resolved "
                           "against the job spec's folder)")


def test_missing_chart_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DAT_CHART", str(tmp_path / "nochart"))
    code, out, err = render(capsys, str(ROOT / "manifests" / "specs" / "dat-smoke.yaml"))
    assert code == 2 and out == ""
    assert err == (f"datctl: chart not found: {tmp_path / 'nochart' / 'values.yaml'} does not exist "
                   f"(DAT_CHART={tmp_path / 'nochart'}; set DAT_CHART to the dat-training chart folder)\n")


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("datctl: warning: ")]


def test_replaced_trainer_settings_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_spec(tmp_path, {"trainer/run/output_dir": "runs/mine", "trainer/metrics/port": 9100,
                                 "trainer/metrics/job_name": "my-run", "checkpoint/claimName": "ckpt",
                                 "image/repository": "ghcr.io/team/dat-k8s"})
    code, out, err = render(capsys, str(path))
    assert code == 0 and out
    assert warnings(err) == [
        "datctl: warning: trainer: run.output_dir 'runs/mine' is replaced by '/checkpoints/dat-smoke' (on the "
        "checkpoint volume, checkpoint.mountPath/name, so a restarted pod resumes)",
        "datctl: warning: trainer: metrics.port 9100 is replaced by 9400 (the job spec's metrics.port, which the "
        "pods and the PodMonitor use; set metrics.port instead)",
        "datctl: warning: trainer: metrics.job_name 'my-run' is replaced by 'dat-smoke' (the job's name, which the "
        "alerts and dashboard match the job's metrics with)",
    ]
    config = yaml.safe_load(yaml.safe_load_all(out).__next__()["data"]["config.yaml"])
    assert config["run"]["output_dir"] == "/checkpoints/dat-smoke" and config["metrics"]["port"] == 9400
    assert config["metrics"]["job_name"] == "dat-smoke"
    # the same values as the chart's: nothing to say
    path = write_spec(tmp_path, {"trainer/run/output_dir": "/checkpoints/dat-smoke/", "trainer/metrics/port": 9400,
                                 "checkpoint/claimName": "ckpt", "image/repository": "ghcr.io/team/dat-k8s"})
    code, _, err = render(capsys, str(path))
    assert code == 0 and warnings(err) == []


def test_an_image_without_a_registry_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The chart's default repository (`make image`'s local name) would be pulled from Docker Hub."""
    code, _, err = render(capsys, str(write_spec(tmp_path, {"checkpoint/claimName": "ckpt"})))
    assert code == 0 and warnings(err) == [
        "datctl: warning: image.repository: 'dat-k8s' names no registry, so nodes pull docker.io/library/dat-k8s, "
        "which is not this project's image; push `make image` to your registry and set image.repository"]
    preloaded = write_spec(tmp_path, {"checkpoint/claimName": "ckpt", "image/pullPolicy": "Never"})  # kind
    code, _, err = render(capsys, str(preloaded))
    assert code == 0 and warnings(err) == []


def test_checkpoints_on_an_empty_dir_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = render(capsys, str(write_spec(tmp_path, {"image/repository": "ghcr.io/team/dat-k8s"})))
    assert code == 0 and out
    assert warnings(err) == ["datctl: warning: checkpoint.claimName is empty: checkpoints go to an emptyDir and "
                             "are lost with the pod (a rescheduled or deleted pod starts over); set "
                             "checkpoint.claimName to a PVC to keep them"]



def test_an_exit_code_policy_without_a_deadline_is_warned_about(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    base = {"image/repository": "ghcr.io/team/dat-k8s", "checkpoint/claimName": "ckpt", "restartPolicy": "ExitCode"}
    code, _, err = render(capsys, str(write_spec(tmp_path, {**base, "runPolicy/activeDeadlineSeconds": 0})))
    assert code == 0 and warnings(err) == [
        "datctl: warning: restartPolicy ExitCode restarts a pod that exited 128 or above (SIGTERM, a lost peer, an "
        "OOM kill) without limit, as the operator counts none of them against backoffLimit; set "
        "runPolicy.activeDeadlineSeconds to bound the job"]
    bounded = write_spec(tmp_path, {**base, "runPolicy/activeDeadlineSeconds": 86400})
    code, _, err = render(capsys, str(bounded))
    assert code == 0 and warnings(err) == []

@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_objects_datctl_applies_say_datctl_manages_them(api: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """The chart labels its objects managed-by Helm (.Release.Service); datctl applies them without a Helm
    release, so the label must not claim one."""
    objects = rendered_objects(capsys, str(write_spec(tmp_path)), "--api", api)
    assert {kind: o["metadata"]["labels"]["app.kubernetes.io/managed-by"] for kind, o in objects.items()} == \
        {kind: "datctl" for kind in objects}
    assert "managed-by: Helm" not in yaml.safe_dump(list(objects.values()))


def test_the_checks_that_need_the_model_run_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What `dat-train --check` would refuse must not become crash-looping pods: JointSpar's budget against the
    model's arms."""
    path = write_spec(tmp_path, {"trainer/model/name": "small_cnn", "trainer/jointspar/enabled": True})
    code, _, err = render(capsys, str(path))
    assert code == 2 and err.strip().splitlines() == [
        "datctl: trainer: jointspar.budget 40 exceeds the number of arms L = 16 (param grouping); "
        "use a budget <= 16"], err


def test_unreadable_inputs_and_bad_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00nodes: 1\n")
    spec_file = write_spec(tmp_path)
    for argv, line in (
            (["render", str(tmp_path)], f"datctl: {tmp_path}: cannot read the job spec (Is a directory)"),
            (["render", str(binary)], f"datctl: {binary}: not a text file"),
            (["render", str(spec_file), "-o", str(spec_file)], f"datctl: -o {spec_file}: cannot write "),
            (["render", str(spec_file), "-n", "Bad_NS"], "datctl: -n Bad_NS: not a namespace name"),
            (["validate", str(binary)], f"datctl: {binary}: cannot read: not a text file")):
        code = cli.main(argv)
        errors = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("datctl: warning: ")]
        assert code == 2 and len(errors) == 1 and errors[0].startswith(line), (argv, errors)
    job = tmp_path / "job-manifest.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"},
                                   "spec": {"elasticPolicy": {"maxReplicas": "x"}, "pytorchReplicaSpecs": {
                                       "Worker": {"replicas": 1, "template": {"spec": {"containers": [
                                           {"name": "pytorch", "image": "i"}]}}}}}}))
    assert cli.main(["validate", str(job)]) == 2
    assert "spec.elasticPolicy.maxReplicas: must be an integer, got 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["watch", "j", "--interval", "0"])  # a GET loop on the API server
    assert exit_info.value.code == 2 and "--interval: must be at least 1 seconds, got 0" in capsys.readouterr().err


def test_trainjob_says_which_settings_it_does_not_apply(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_spec(tmp_path, {"api": "trainjob", "restartPolicy": "Never", "image/pullPolicy": "Never"})
    code, _, err = render(capsys, str(path))
    assert code == 0, err
    assert "warning: restartPolicy: 'Never' is not applied with api trainjob" in err
    assert "warning: image.pullPolicy: 'Never' is not applied with api trainjob" in err
    assert "warning: runPolicy.backoffLimit: 2 is not applied" in err  # the smoke spec's 2, not the chart's 3
    assert "ttlSecondsAfterFinished: 3600" in err and "cleanPodPolicy" not in err  # only what differs from the chart


@pytest.mark.parametrize("item, line", [
    ("imagePullSecrets[100000000].name=x", "list index 100000000 is larger than the 65536 helm allows"),
    ("podAnnotations.a[²]=1", "list index '²' is not a number"),
    ("a..b=1", "a key in the path is empty"),
    ("imagePullSecrets[0]b=1", "unexpected data after a list index"),
    ("env.A={x", "a list {...} is not closed"),
    ("nodePool.tolerations[0].key=x,nodePool.tolerations.key=y", "nodePool.tolerations is a list here, not a map"),
    ("trainer.optim.milestones=[0.5,0.9]",  # dat-train's syntax
     "expected key.path=value; a list is {a,b} in helm's --set (or --set-json 'key=[a,b]')"),
])
def test_set_syntax_helm_refuses_is_one_line(item: str, line: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(write_spec(tmp_path)), "--set", item)
    assert code == 2 and err == f"datctl: --set {item}: {line}\n", err


@pytest.mark.parametrize("flag, item, line", [
    ("--set-json", "nodes=3x", "expected ',' after the JSON value"),
    ("--set-json", "nodePool.tolerations=[{", "the value is not JSON (Expecting property name enclosed in double "
                                              "quotes at character 24)"),
    ("--set-string", "env.A", "expected key.path=value"),
])
def test_typed_set_flags_refuse_bad_syntax_in_one_line(flag: str, item: str, line: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(write_spec(tmp_path)), flag, item)
    assert code == 2 and err == f"datctl: {flag} {item}: {line}\n", err


@pytest.mark.parametrize("text, line", [
    (None, "values file (-f) not found"),
    ("- nodes\n", "a values file (-f) is a mapping of keys, got list"),
    ("nodes: [1\n", "not valid YAML (line 2, column "),
])
def test_unreadable_values_file_is_one_line(text: str | None, line: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    overlay = tmp_path / "overlay.yaml"
    if text is not None:
        overlay.write_text(text)
    code, _, err = render(capsys, str(write_spec(tmp_path)), "-f", str(overlay))
    assert code == 2 and err.startswith(f"datctl: {overlay}: {line}") and len(err.splitlines()) == 1, err


def test_values_files_apply_on_top_of_the_trainer_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.yaml").write_text("optim: {name: lamb, lr: 0.002}\nrun: {epochs: 5}\n")
    path = write_spec(tmp_path, {"trainer": DELETE, "trainerConfigFile": "train.yaml"})
    (tmp_path / "a.yaml").write_text("trainer: {optim: {lr: 0.004}}\nnodes: 4\n")
    (tmp_path / "b.yaml").write_text("trainer: {run: {epochs: 7}}\nnodes: 2\n")
    objects = rendered_objects(capsys, str(path), "-f", str(tmp_path / "a.yaml"), "-f", str(tmp_path / "b.yaml"),
                               "--set-string", "trainer.run.epochs=9", "--set", "trainer.run.epochs=8")
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    assert config["optim"] == {"name": "lamb", "lr": 0.004}
    assert config["run"]["epochs"] == 9  # --set-string comes after --set, whatever the order on the line
    assert objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # the later -f wins


def test_null_on_what_datctl_reads_means_the_chart_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """helm drops a null key; for the values datctl itself needs (kind, namespace, trainer config, claim) the
    chart's default stands in, as the chart's templates treat a missing and an empty value alike."""
    path = write_spec(tmp_path, {"api": None, "namespace": None, "checkpoint/claimName": None, "trainer": None})
    objects = rendered_objects(capsys, str(path))
    assert objects["PyTorchJob"]["metadata"]["namespace"] == "default"
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    assert "synthetic" not in str(config) and config["run"]["output_dir"].endswith("/dat-smoke")  # defaults
    code, _, err = render(capsys, str(path), "--set", "name=null")
    assert code == 2 and "datctl: name: required" in err and "Traceback" not in err


def test_spec_numbers_are_read_as_helm_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Not YAML 1.1: 1:30 is no base-60 number (90), 1e3 is a number, 0o17 an octal, as in helm's YAML."""
    path = write_spec(tmp_path, text=(ROOT / "manifests" / "specs" / "dat-smoke.yaml").read_text().replace(
        'env:\n  OMP_NUM_THREADS: "1"\n', "env:\n  OMP_NUM_THREADS: \"1\"\n  TIME: 1:30\n  E1: 1e3\n  E4: 0o17\n"))
    objects = rendered_objects(capsys, str(path))
    pod = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert (env["TIME"], env["E1"], env["E4"]) == ("1:30", "1000", "15")


@pytest.mark.parametrize("changes, flags, line", [
    ({"resources/limits/memory": float("nan")}, [], "resources.limits.memory: nan is not a finite number"),
    ({}, ["--set", "runPolicy.activeDeadlineSeconds=9223372036854775807"],
     "runPolicy.activeDeadlineSeconds: 9223372036854775807 is larger than 2^53"),
    ({}, ["--set", "trainer.run.seed=9007199254740993"], "trainer.run.seed: 9007199254740993 is larger than 2^53"),
    ({}, ["--set-json", "env.A=NaN"], "--set-json env.A=NaN: the value is not JSON (NaN is not a JSON number)"),
    ({}, ["--set", "name=" + "a" * 54], "the job name is also the Helm release name, which helm limits to 53"),
    ({"trainer/run/epochs": "3"}, [], "trainer.run.epochs: expected integer, got '3' (helm's values schema refuses it)"),
    ({}, ["--set", "trainer.attack.steps=04"], "trainer.attack.steps: expected integer, got '04'"),
])
def test_what_helm_would_refuse_or_change_is_refused_in_one_line(changes: dict, flags: list, line: str,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(write_spec(tmp_path, changes)), *flags)
    assert code == 2 and line in err and "Traceback" not in err, err


def test_download_into_the_read_only_data_volume_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(write_spec(tmp_path, {"data": {"source": "pvc", "claimName": "dat-data"},
                                                            "trainer/data/name": "cifar10",
                                                            "trainer/data/download": True})))
    assert code == 2 and "trainer.data.download: the data volume is mounted read-only" in err, err


def test_trainer_and_helm_schema_problems_come_in_one_round(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A trainer-config error does not hide what helm's stricter schema refuses elsewhere; a key that both
    refuse is named once, in the trainer's words."""
    code, _, err = render(capsys, str(write_spec(tmp_path, {"trainer/run/epochs": "3", "trainer/optim/name": "adam"})))
    assert code == 2 and "optim.name: 'adam' is not one of lamb, lars, sgd" in err, err
    assert "trainer.run.epochs: expected integer, got '3' (helm's values schema refuses it)" in err
    assert "trainer.optim.name" not in err


def test_set_json_spacing_and_empty_values_as_helm_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    objects = rendered_objects(capsys, str(write_spec(tmp_path)), "--set-json", 'env.A= "x" ,env.B=2 ',
                               "--set-json", "resources.limits=")
    container = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["A"] == "x" and env["B"] == "2" and "limits" not in container["resources"]


def test_dates_and_y_n_read_as_helm_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overlay = tmp_path / "more.yaml"
    overlay.write_text("image: {tag: 2024-01-15}\nenv: {C: y, D: 2024-01-15T10:00:00Z}\n")
    objects = rendered_objects(capsys, str(write_spec(tmp_path)), "-f", str(overlay))
    container = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"].endswith(":2024-01-15") and env["C"] == "true" and env["D"] == "2024-01-15T10:00:00Z"



def test_a_null_section_is_named_not_left_to_helm_internals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = render(capsys, str(write_spec(tmp_path, text=yaml.safe_dump(SMOKE) + "nodePool:\n")))
    assert code == 2 and "datctl: nodePool: null removes the chart's whole nodePool section" in err, err
    assert "helm template failed" not in err and len(without_warning_lines(err)) == 1
    assert rendered_objects(capsys, str(write_spec(tmp_path)), "--set", "resources=null")  # helm renders that


def without_warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("datctl: warning: ")]


def test_datctl_renders_the_network_policy_but_not_the_exporter(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    path = str(write_spec(tmp_path, {"networkPolicy/enabled": True, "exporter/enabled": True}))
    code, out, _ = render(capsys, path)
    assert code == 0
    objects = list(yaml.safe_load_all(out))
    kinds = [o["kind"] for o in objects]
    assert kinds.index("NetworkPolicy") < kinds.index("PyTorchJob") and "Deployment" not in kinds
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]  # the trainer's; the exporter is helm's
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert render(capsys, path)[2].count("exporter.enabled: datctl submits the run's own objects") == 1


def test_a_helm_named_by_dat_helm_that_is_not_there_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """DAT_HELM names the helm to use: one missing is an error, not a quiet fall-back to another helm."""
    monkeypatch.setenv("DAT_HELM", str(tmp_path / "helm-3.8"))
    code, out, err = render(capsys, str(ROOT / "manifests" / "specs" / "dat-smoke.yaml"))
    assert code == 2 and out == ""
    assert err == f"datctl: DAT_HELM={tmp_path / 'helm-3.8'}: not an executable file (unset it to use helm from PATH or ./bin)\n"
