"""charts/dat-training with the real helm binary: lint, template, values.schema.json, the chart's own rules,
PodMonitor gating, least-privilege RBAC, locked-down pods, and one source of truth (helm template and
datctl render give the same objects for the same file)."""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from controller import chart, cli, spec

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dat-training"
EXAMPLES = sorted((CHART / "ci").glob("*.yaml"))
MONITORING = CHART / "ci" / "monitoring-values.yaml"  # job.enabled false: no run, datctl refuses it
RUNS = [p for p in EXAMPLES if p != MONITORING]
SMOKE = ROOT / "manifests" / "specs" / "dat-smoke.yaml"
INLINE_SPECS = RUNS + [SMOKE]  # values files with an inline trainer config: helm can read them as they are


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([chart.helm_binary(), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def template(*args: str, release: str = "run") -> list[tuple[str, dict]]:
    return chart.parse_rendered(helm("template", release, str(CHART), *args).stdout)


def kinds(objects: list[tuple[str, dict]]) -> list[str]:
    return sorted(obj["kind"] for _, obj in objects)


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", INLINE_SPECS, ids=lambda p: p.name)
def test_helm_template_and_datctl_render_agree(values: Path, tmp_path: Path) -> None:
    name = yaml.safe_load(values.read_text())["name"]
    by_helm = [obj for source, obj in template("-f", str(values), "--namespace", "default",
                                               "--api-versions", chart.MONITORING_API, release=name)
               if source in chart.RUN_TEMPLATES]
    assert cli.main(["render", str(values), "-o", str(tmp_path)]) == 0
    by_datctl = list(yaml.safe_load_all((tmp_path / f"{name}.yaml").read_text()))
    assert {o["metadata"]["labels"][spec.MANAGED_BY] for o in by_helm} == {"Helm"}
    for obj in by_helm:  # the one intended difference: datctl, not a Helm release, manages what it applies
        spec.set_manager_label(obj, "datctl")
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(by_helm, key=key) == sorted(by_datctl, key=key)
    assert {o["kind"] for o in by_datctl} >= {"ConfigMap"} and any(o["kind"] in ("PyTorchJob", "TrainJob")
                                                                    for o in by_datctl)


def test_trainer_config_file_is_the_same_as_inline(tmp_path: Path) -> None:
    """A published spec reads its trainer config from configs/; helm gets the same file's content inline."""
    spec_path = ROOT / "manifests" / "specs" / "dat-c10ext-resnet18-lamb.yaml"
    values = yaml.safe_load(spec_path.read_text())
    values["trainer"] = yaml.safe_load((spec_path.parent / values.pop("trainerConfigFile")).read_text())
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump(values))
    by_helm = [obj for source, obj in template("-f", str(inline), "--api-versions", chart.MONITORING_API,
                                               release=values["name"]) if source in chart.RUN_TEMPLATES]
    by_datctl = spec.render(spec.load_spec(spec_path)).objects
    for obj in by_helm:
        spec.set_manager_label(obj, "datctl")
    assert sorted(by_helm, key=lambda o: o["kind"]) == sorted(by_datctl, key=lambda o: o["kind"])


def test_helm_values_of_a_spec_install_what_datctl_submits(tmp_path: Path) -> None:
    """`datctl render --helm-values` (trainerConfigFile inlined, --set applied): helm renders from that file the
    objects datctl renders from the spec, so a GitOps tool can install the spec with the chart."""
    spec_path = ROOT / "manifests" / "specs" / "dat-c10ext-resnet18-lamb.yaml"
    extra = ["--set", "nodes=4", "--set", "trainer.run.epochs=3"]
    assert cli.main(["render", str(spec_path), *extra, "--helm-values", "-o", str(tmp_path)]) == 0
    values_file = tmp_path / "dat-c10ext-resnet18-lamb-values.yaml"
    assert "trainerConfigFile: ''" in values_file.read_text() and "epochs: 3" in values_file.read_text()
    by_helm = [obj for source, obj in template("-f", str(values_file), "--api-versions", chart.MONITORING_API,
                                               "--namespace", "default", release="dat-c10ext-resnet18-lamb")
               if source in chart.RUN_TEMPLATES]
    by_datctl = spec.render(spec.load_spec(spec_path, extra[1::2])).objects
    for obj in by_helm:
        spec.set_manager_label(obj, "datctl")
    assert sorted(by_helm, key=lambda o: o["kind"]) == sorted(by_datctl, key=lambda o: o["kind"])


@pytest.mark.parametrize("setting, complaint", [
    ("nodes=0", "at '/nodes': minimum: got 0, want 1"),
    ("gpusPerNode=-1", "at '/gpusPerNode'"),
    ("api=tfjob", "at '/api'"),
    ("nodez=3", "additional properties 'nodez' not allowed"),
    ("restartPolicy=Sometimes", "at '/restartPolicy'"),
    ("resources.limits.memory=10Gb", "at '/resources/limits/memory'"),
    ("shm.sizeLimit=lots", "at '/shm/sizeLimit'"),
    ("name=Dat_Run", "at '/name'"),
    ("securityContext.runAsUser=0", "at '/securityContext/runAsUser'"),
    ("data.source=s3", "at '/data/source'"),
    ("metrics.podMonitor=maybe", "at '/metrics/podMonitor'"),
    ("runPolicy.cleanPodPolicy=Some", "at '/runPolicy/cleanPodPolicy'"),
    ("nodePool.provider=gcp", "at '/nodePool/provider'"),
    ("trainer.optim.lrr=0.1", "at '/trainer/optim': additional properties 'lrr' not allowed"),
    ("trainer.attack.steps=ten", "at '/trainer/attack/steps': got string, want integer"),
    ("trainer.optimizer.name=lamb", "at '/trainer': additional properties 'optimizer' not allowed"),
    ("trainer.optim.name=adam", "at '/trainer/optim/name': value must be one of 'lamb', 'lars', 'sgd'"),
    ("trainer.perf.amp=fp16", "at '/trainer/perf/amp': value must be one of"),
    ("trainer.data.name=imagenet", "at '/trainer/data/name': value must be one of"),
    ("exporter.args={--namespace=}", "at '/exporter/args/0': 'not' failed"),
    ("exporter.args={-n,kube-system}", "at '/exporter/args/0': 'not' failed"),
])
def test_values_schema_rejects(setting: str, complaint: str) -> None:
    proc = helm("template", "run", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0
    assert complaint in proc.stderr, proc.stderr


def test_values_schema_trainer_section_follows_trainer_config() -> None:
    """The trainer part of values.schema.json is generated from trainer/config.py (`make manifests`)."""
    import json
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["trainer"] == chart.trainer_schema()
    budget = schema["properties"]["trainer"]["properties"]["jointspar"]["properties"]["budget"]
    assert {"type": "number"} in budget["anyOf"]


def test_values_schema_choices_are_the_trainer_configs() -> None:
    """Every choice field's enum holds exactly what trainer/config.py accepts (and its YAML 1.1 booleans)."""
    from trainer import config as trainer_config
    sections = chart.trainer_schema()["properties"]
    assert sections["optim"]["properties"]["name"] == {"enum": ["lamb", "lars", "sgd"]}
    assert sections["data"]["properties"]["augment"] == {"enum": ["auto", "on", "off", True, False]}
    choices = trainer_config.CHOICES
    assert len(choices) >= 10
    for key, allowed in choices.items():
        section, name = key.split(".")
        assert sections[section]["properties"][name]["enum"][:len(allowed)] == list(allowed)
        for value in sections[section]["properties"][name]["enum"]:
            extra = {"budget": 0.5} if (key, value) == ("jointspar.budget_unit", "bytes") else {}  # a fraction
            trainer_config.validate(trainer_config.config_from_dict({section: {name: value, **extra}}),
                                    check_paths=False)
        with pytest.raises(trainer_config.ConfigError, match=f"{key}: 'nope' is not one of"):
            trainer_config.validate(trainer_config.config_from_dict({section: {name: "nope"}}), check_paths=False)


def test_values_schema_takes_yaml_booleans_for_on_off_choices(tmp_path: Path) -> None:
    """helm reads `augment: off` as false; trainer/config.py reads it back as off."""
    values = tmp_path / "values.yaml"
    values.write_text("trainer: {data: {augment: off}, perf: {amp: off, channels_last: on}}\n")
    config = next(obj for _, obj in template("-f", str(values)) if obj["kind"] == "ConfigMap"
                  and obj["metadata"]["name"] == "run-config")
    from trainer import config as trainer_config
    cfg = trainer_config.config_from_dict(yaml.safe_load(config["data"]["config.yaml"]))
    assert (cfg.data.augment, cfg.perf.amp, cfg.perf.channels_last) == ("off", "off", "on")


@pytest.mark.parametrize("settings, complaint", [
    (["gpusPerNode=2", "nprocPerNode=1"], "nprocPerNode 1 does not match gpusPerNode 2"),
    (["name=" + "a" * 55, "nodes=12"], "pod name \"" + "a" * 55 + "-worker-10\" exceeds 63 characters"),
    (["data.source=pvc"], "data.claimName: required when data.source is pvc"),
    (["data.source=pvc", "api=trainjob"], "data.claimName: required when data.source is pvc"),
    (["trainerConfigFile=some.yaml"], "trainerConfigFile is read by datctl only; with helm put the trainer "
                                      "config inline under trainer: (or use datctl render)"),
    (["trainerConfigFile=some.yaml", "api=trainjob"], "trainerConfigFile is read by datctl only"),
])
def test_chart_rules_beyond_the_schema(settings: list[str], complaint: str) -> None:
    args = [x for s in settings for x in ("--set", s)]
    proc = helm("template", "run", str(CHART), *args, check=False)
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


def test_helm_refuses_a_spec_with_trainer_config_file() -> None:
    """helm cannot read the file: rendering the chart's default trainer config instead would train the wrong
    thing. datctl reads the same spec (and hands helm the file's content inline)."""
    published = ROOT / "manifests" / "specs" / "dat-c10ext-resnet18-lamb.yaml"
    assert "trainerConfigFile" in yaml.safe_load(published.read_text())
    proc = helm("template", "run", str(CHART), "-f", str(published), check=False)
    assert proc.returncode != 0 and "trainerConfigFile is read by datctl only" in proc.stderr, proc.stderr
    assert spec.render(spec.load_spec(published)).job["kind"] == "PyTorchJob"


def test_release_name_must_make_a_valid_job_name() -> None:
    """Without `name`, the job is named after the release, which helm allows to start with a digit."""
    proc = helm("template", "1st-run", str(CHART), check=False)
    assert proc.returncode != 0 and 'name "1st-run" must be a DNS-1035 label' in proc.stderr, proc.stderr
    job = next(obj for _, obj in template("--set", "name=first-run", release="1st-run") if obj["kind"] == "PyTorchJob")
    assert job["metadata"]["name"] == "first-run"


@pytest.mark.parametrize("args, expected", [
    ([], False),  # auto, and helm template knows no monitoring.coreos.com/v1
    (["--api-versions", chart.MONITORING_API], True),
    (["--api-versions", chart.MONITORING_API, "--set", "metrics.podMonitor=false"], False),
    (["--set", "metrics.podMonitor=true"], True),
    (["--set", "metrics.podMonitor=true", "--set", "metrics.port=0"], False),
    (["--api-versions", chart.MONITORING_API, "--set", "api=trainjob"], True),
    (["--set", "metrics.podMonitor=true", "--set", "api=trainjob", "--set", "metrics.port=0"], False),
])
def test_podmonitor_gating(args: list[str], expected: bool) -> None:
    """Which PodMonitor finds which pods and port: tests/test_podmonitor_discovery.py, in a real Prometheus."""
    rendered = template(*args, "--set", "dashboard.enabled=false")
    monitors = [obj for source, obj in rendered if source == "podmonitor.yaml"]
    assert bool(monitors) == expected
    if monitors and "api=trainjob" not in args:
        job = next(obj for _, obj in rendered if obj["kind"] == "PyTorchJob")
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        assert monitors[0]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        assert monitors[0]["spec"]["podMetricsEndpoints"][0]["port"] in ports


@pytest.mark.parametrize("api, group, plural", [("pytorchjob", "kubeflow.org", "pytorchjobs"),
                                                ("trainjob", "trainer.kubeflow.org", "trainjobs")])
def test_exporter_is_least_privilege(api: str, group: str, plural: str) -> None:
    rendered = dict(((obj["kind"], obj["metadata"]["name"]), obj) for source, obj in
                    template("--set", "exporter.enabled=true", "--set", f"api={api}", "--namespace", "team-a",
                             "--set", "exporter.args={--watch-timeout=60}")
                    if source == "exporter.yaml")
    role = rendered[("Role", "run-exporter")]
    assert role["metadata"]["namespace"] == "team-a"
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {((group,), (plural,)): {"get", "list", "watch"}}  # list/watch return .status: no subresource
    assert not any(kind == "ClusterRole" for kind, _ in rendered)
    binding = rendered[("RoleBinding", "run-exporter")]
    assert binding["roleRef"]["name"] == "run-exporter"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "run-exporter", "namespace": "team-a"}]
    deployment = rendered[("Deployment", "run-exporter")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "run-exporter"
    container = pod["containers"][0]
    assert container["command"] == ["datctl", "exporter"]
    # the arguments the chart passes are ones `datctl exporter` accepts
    from controller import exporter
    parser = argparse.ArgumentParser(allow_abbrev=False)  # as `datctl exporter` parses them
    exporter.add_arguments(parser)
    parsed = parser.parse_args(container["args"])
    assert parsed.namespace == "team-a" and parsed.port == container["ports"][0]["containerPort"]
    assert parsed.watch_timeout == 60  # exporter.args, before the chart's own flags (which win)
    assert container["args"][-3:] == [f"--api={api}", "--namespace=team-a", f"--port={parsed.port}"]
    assert parsed.api == api
    service = rendered[("Service", "run-exporter")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_network_policy_lets_in_only_the_job_and_prometheus(api: str) -> None:
    import kubernetes_validate
    objects = template("--set", "networkPolicy.enabled=true", "--set", f"api={api}", "--namespace", "team-a")
    (policy,) = [obj for source, obj in objects if source == "networkpolicy.yaml"]
    kubernetes_validate.validate(policy, "1.33", strict=True)
    job_pods = {"app.kubernetes.io/name": "dat-training", "app.kubernetes.io/instance": "run",
                "app.kubernetes.io/component": "trainer"}
    # it selects exactly the trainer pods the job creates
    pods = [p for _, obj in objects for p in pod_templates_meta(obj)]
    assert pods and all(job_pods.items() <= p["labels"].items() for p in pods)
    assert policy["spec"]["podSelector"] == {"matchLabels": job_pods}
    ingress = policy["spec"]["ingress"]
    assert ingress[0] == {"from": [{"podSelector": {"matchLabels": job_pods}}]}  # rendezvous and NCCL, any port
    assert ingress[1]["ports"] == [{"protocol": "TCP", "port": 9400}]
    assert ingress[1]["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    egress = policy["spec"]["egress"]
    assert egress[0] == {"to": [{"podSelector": {"matchLabels": job_pods}}]}
    assert {p["port"] for p in egress[1]["ports"]} == {53} and len(egress) == 2  # nothing else goes out
    download = template("--set", "networkPolicy.enabled=true", "--set", "data.source=download")
    (policy,) = [obj for source, obj in download if source == "networkpolicy.yaml"]
    assert policy["spec"]["egress"][2] == {"ports": [{"protocol": "TCP", "port": 443}]}
    assert not [obj for source, obj in template() if source == "networkpolicy.yaml"]  # off by default


def test_network_policy_for_the_exporter_lets_in_prometheus_and_out_the_api() -> None:
    import kubernetes_validate
    objects = template("--set", "networkPolicy.enabled=true", "--set", "exporter.enabled=true")
    policies = {obj["metadata"]["name"]: obj for source, obj in objects if source == "networkpolicy.yaml"}
    assert set(policies) == {"run", "run-exporter"}
    policy = policies["run-exporter"]
    kubernetes_validate.validate(policy, "1.33", strict=True)
    (deployment,) = [obj for _, obj in objects if obj["kind"] == "Deployment"]
    exporter_pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": exporter_pods}
    assert not exporter_pods.items() <= policies["run"]["spec"]["podSelector"]["matchLabels"].items()
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 9469}]
    assert ingress["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    dns, api = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["port"] for p in api["ports"]} == {443, 6443} and "to" not in api
    # an ipBlock for the API endpoint replaces the default; no metricsFrom: nothing gets in
    values = ["--set", "networkPolicy.enabled=true", "--set", "exporter.enabled=true",
              "--set-json", 'networkPolicy.apiServerEgress=[{"to":[{"ipBlock":{"cidr":"10.0.0.1/32"}}],'
              '"ports":[{"protocol":"TCP","port":443}]}]', "--set-json", "networkPolicy.metricsFrom=[]"]
    (policy,) = [obj for source, obj in template(*values)
                 if source == "networkpolicy.yaml" and obj["metadata"]["name"] == "run-exporter"]
    kubernetes_validate.validate(policy, "1.33", strict=True)
    assert policy["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert policy["spec"]["ingress"] == []


def pod_templates_meta(obj: dict) -> list[dict]:
    """The metadata of every trainer pod template of a PyTorchJob or TrainJob."""
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["metadata"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "TrainJob":
        return [j["template"]["spec"]["template"]["metadata"] for p in obj["spec"]["runtimePatches"]
                for j in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
    return []


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_secrets_reach_the_trainer_as_secret_references(api: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """extraEnv: EnvVars with valueFrom, so a credential never sits in the job spec; helm and datctl agree,
    and the job still matches its CRD."""
    from controller.schemas import crd_problems
    values = tmp_path / "values.yaml"
    ref = {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    values.write_text(yaml.safe_dump({"api": api, "extraEnv": [ref]}))
    (job,) = [obj for _, obj in template("-f", str(values)) if obj["kind"] in ("PyTorchJob", "TrainJob")]
    assert crd_problems(job) == []
    if api == "pytorchjob":
        envs = [c["env"] for r in job["spec"]["pytorchReplicaSpecs"].values()
                for c in r["template"]["spec"]["containers"]]
    else:
        envs = [job["spec"]["trainer"]["env"]]
    assert envs and all(ref in env for env in envs)
    assert "api-key" not in yaml.safe_dump([o for _, o in template("-f", str(values)) if o["kind"] == "ConfigMap"])
    assert cli.main(["render", str(values), "--set", "name=run"]) == 0
    assert yaml.safe_dump(ref["valueFrom"]).strip().splitlines()[0] in capsys.readouterr().out
    bad = helm("template", "run", str(CHART), "--set", "extraEnv[0].value=x", check=False)
    assert bad.returncode != 0 and "extraEnv/0" in bad.stderr  # an EnvVar needs its name


def pod_templates(obj: dict) -> list[dict]:
    """(pod spec, containers) of every pod a rendered object creates."""
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "TrainJob":
        return [j["template"]["spec"]["template"]["spec"]
                for p in obj["spec"]["runtimePatches"]
                for j in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
    return []


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_every_pod_is_locked_down(values: Path | None) -> None:
    args = ["--set", "exporter.enabled=true"] + (["-f", str(values)] if values else [])
    pods = [pod for _, obj in template(*args) for pod in pod_templates(obj)]
    assert len(pods) >= (1 if values == MONITORING else 2)  # the exporter's (and the trainer's)
    for pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v}
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in writable, "a read-only root filesystem needs a writable /tmp"


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_trainer_pods_mount_no_api_token(api: str) -> None:
    """The trainer never calls the API: its pods get no token, set on the pod (PyTorchJob) or, as a TrainJob
    cannot set it per pod, on the ServiceAccount the chart makes for them; a given serviceAccountName decides."""
    objects = template("--set", f"api={api}")
    accounts = {obj["metadata"]["name"]: obj for _, obj in objects if obj["kind"] == "ServiceAccount"}
    pods = [pod for _, obj in objects if obj["kind"] == ("PyTorchJob" if api == "pytorchjob" else "TrainJob")
            for pod in pod_templates(obj)]
    assert pods
    for pod in pods:
        token = pod.get("automountServiceAccountToken")
        if token is None:
            token = accounts[pod["serviceAccountName"]]["automountServiceAccountToken"]
        assert token is False, pod
    given = template("--set", f"api={api}", "--set", "serviceAccountName=data-reader")
    assert "ServiceAccount" not in kinds(given)
    assert {pod["serviceAccountName"] for _, obj in given for pod in pod_templates(obj)} == {"data-reader"}


def test_notes_tell_how_to_follow_the_run() -> None:
    proc = helm("install", "smoke", str(CHART), "-f", str(SMOKE), "--dry-run=client", "--namespace", "team-a")
    notes = proc.stdout[proc.stdout.index("NOTES:"):]
    assert "datctl watch dat-smoke -n team-a" in notes
    assert "kubectl logs -f dat-smoke-master-0 -c pytorch -n team-a" in notes
    elastic = helm("install", "el", str(CHART), "-f", str(CHART / "ci" / "aks-elastic-values.yaml"), "--dry-run=client")
    assert "-worker-0 -c pytorch" in elastic.stdout and "-master-0" not in elastic.stdout  # elastic: Workers only


def test_float_keys_take_fractions_as_papers_write_them() -> None:
    config = next(obj for _, obj in template("--set-string", "trainer.attack.eps=8/255") if obj["kind"] == "ConfigMap")
    from trainer.config import config_from_dict
    assert config_from_dict(yaml.safe_load(config["data"]["config.yaml"])).attack.eps == 8 / 255
    proc = helm("template", "run", str(CHART), "--set-string", "trainer.attack.eps=8x", check=False)
    assert proc.returncode != 0 and "/trainer/attack/eps" in proc.stderr


def test_set_reads_values_as_helm_does(capsys: pytest.CaptureFixture) -> None:
    """datctl render --set and helm template --set give the same pod env, image and trainer config: versions
    and octal-looking strings stay strings, big integers stay integers, a trainer float may be --set."""
    sets = ["image.tag=1.10", "env.MODE=0755", "nccl.NCCL_BUFFSIZE=4194304,nccl.NCCL_DEBUG=INFO",
            "trainer.optim.lr=0.001", "trainer.optim.betas={0.8,0.99}", "env.ID=12345678901234567,env.R=1e3",
            "env.A=x}y,imagePullSecrets[0].name=regcred", "resources.limits.memory=null", "env.WIN=C:\\temp"]
    flags = [arg for item in sets for arg in ("--set", item)]
    assert cli.main(["render", str(SMOKE), *flags]) == 0
    ours = {doc["kind"]: doc for doc in yaml.safe_load_all(capsys.readouterr().out)}
    theirs = {obj["kind"]: obj for _, obj in template("-f", str(SMOKE), *flags, release="dat-smoke")
              if obj["kind"] != "ConfigMap" or "config.yaml" in obj.get("data", {})}

    def container(objects: dict) -> dict:
        return objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]

    for objects in (ours, theirs):
        env = {e["name"]: e.get("value") for e in container(objects)["env"]}
        assert env["MODE"] == "0755" and env["NCCL_BUFFSIZE"] == "4194304" and env["NCCL_DEBUG"] == "INFO"
        assert env["ID"] == "12345678901234567" and env["R"] == "1e3" and env["A"] == "x}y" and env["WIN"] == "C:temp"
        pod = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert "memory" not in container(objects)["resources"].get("limits", {})  # null removes the default
        assert container(objects)["image"].endswith(":1.10")
        optim = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])["optim"]
        assert float(optim["lr"]) == 0.001 and [float(b) for b in optim["betas"]] == [0.8, 0.99]


def test_values_files_and_typed_sets_as_helm_applies_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """-f, --set-json and --set-string mean in datctl what they mean in helm, in helm's order (files, then
    --set-json, --set, --set-string, whatever the order on the command line)."""
    (tmp_path / "a.yaml").write_text("nodes: 4\nenv: {A: one}\nresources: {limits: {memory: 1Gi}}\n")
    (tmp_path / "b.yaml").write_text("env: {A: two}\nimage: {tag: '2.0'}\nresources: {limits: {memory: null}}\n")
    flags = ["-f", str(tmp_path / "a.yaml"), "-f", str(tmp_path / "b.yaml"),
             "--set-string", "env.S=true,env.C=string", "--set", "env.C=7",
             "--set-json", 'nodePool.tolerations=[{"key":"gpu","operator":"Exists"}],env.C="json",env.N=1.5']
    assert cli.main(["render", str(SMOKE), *flags]) == 0
    ours = {doc["kind"]: doc for doc in yaml.safe_load_all(capsys.readouterr().out)}
    theirs = {obj["kind"]: obj for _, obj in template("-f", str(SMOKE), *flags, release="dat-smoke")
              if obj["kind"] != "ConfigMap" or "config.yaml" in obj.get("data", {})}
    for objects in (ours, theirs):
        replicas = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]
        pod = replicas["Master"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert replicas["Worker"]["replicas"] == 3 and container["image"].endswith(":2.0")
        assert env["A"] == "two" and env["S"] == "true" and env["C"] == "string"
        assert env["N"] == "1.5"
        assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
        assert "memory" not in container["resources"].get("limits", {})


def test_a_null_without_a_default_is_refused_as_helm_refuses_it(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """A null removes a chart default; where the chart has none (env.GONE) helm keeps it and its schema refuses
    it: datctl says the same, in its own line, instead of rendering what helm would not."""
    (tmp_path / "extra.yaml").write_text("env: {GONE: null}\n")
    proc = helm("template", "run", str(CHART), "-f", str(SMOKE), "-f", str(tmp_path / "extra.yaml"), check=False)
    assert proc.returncode != 0 and "/env/GONE" in proc.stderr
    assert cli.main(["render", str(SMOKE), "-f", str(tmp_path / "extra.yaml")]) == 2
    assert "datctl: env.GONE: expected string or number or boolean, got null" in capsys.readouterr().err
    # the same for a key the spec (not the chart) gives
    proc = helm("template", "run", str(CHART), "-f", str(SMOKE), "--set", "env.OMP_NUM_THREADS=null", check=False)
    assert proc.returncode != 0 and "/env/OMP_NUM_THREADS" in proc.stderr
    assert cli.main(["render", str(SMOKE), "--set", "env.OMP_NUM_THREADS=null"]) == 2
    assert "datctl: env.OMP_NUM_THREADS: expected string or number or boolean, got null" in capsys.readouterr().err


def test_a_blank_api_renders_the_default_job_as_datctl_does(tmp_path: Path) -> None:
    """`api:` left blank (null): helm renders the default PyTorchJob, not a release without a job."""
    (tmp_path / "blank.yaml").write_text("api:\n")
    assert "PyTorchJob" in kinds(template("-f", str(tmp_path / "blank.yaml")))
    assert "PyTorchJob" in kinds(template("--set", "api=null"))


# Values helm would otherwise render into a broken job; datctl refuses them with the same words.
BROKEN_COMBINATIONS = {
    "trainjob-download": ({"api": "trainjob", "data": {"source": "download"}},
                          "data.source: download needs an init container, which api trainjob cannot add"),
    "cifar-without-data": ({"trainer": {"data": {"name": "cifar10"}}},
                           "data.source: trainer data.name cifar10 needs a data volume (pvc or download)"),
    "ext-download": ({"trainer": {"data": {"name": "cifar10-ext"}}, "data": {"source": "download"}},
                     "data.source: download fetches CIFAR-10 only"),
    "elastic-range": ({"elastic": {"enabled": True}}, "elastic: nodes 2 is outside minNodes..maxNodes (1..1)"),
    "elastic-trainjob": ({"api": "trainjob", "elastic": {"enabled": True, "maxNodes": 2}},
                         "elastic.enabled: not supported with api trainjob"),
    "two-schedulers": ({"scheduling": {"kueueQueue": "q", "volcano": {"enabled": True}}},
                       "scheduling: kueueQueue and volcano.enabled cannot be combined"),
    "gang-too-big": ({"scheduling": {"volcano": {"enabled": True, "minAvailable": 3}}},
                     "scheduling.volcano.minAvailable: 3 exceeds the 2 pods the job creates"),
    "chart-label": ({"podLabels": {"app.kubernetes.io/instance": "other"}},
                    "podLabels.app.kubernetes.io/instance: set by the chart"),
}


@pytest.mark.parametrize("case", BROKEN_COMBINATIONS)
def test_helm_refuses_what_datctl_refuses(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """GitOps users (Argo CD, Flux) never run datctl: the chart itself must fail on these, with one line."""
    values, message = BROKEN_COMBINATIONS[case]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"name": "run", **values}))
    proc = helm("template", "run", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert cli.main(["render", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_pod_spec_escape_hatches_reach_every_trainer_pod(api: str, tmp_path: Path) -> None:
    """extraVolumes / extraVolumeMounts (an InfiniBand device, a CSI volume), topologySpreadConstraints and
    runtimeClassName: in the pod spec of both job kinds, valid against their CRDs; the chart's own volume
    names are refused. terminationGracePeriodSeconds reaches the pods, and torchrun's wait for its workers
    after a SIGTERM (the step checkpoint) ends 5 s before it."""
    from controller.schemas import crd_problems
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": {"matchLabels": {"training.kubeflow.org/job-name": "run"}}}
    values = {"api": api, "runtimeClassName": "nvidia", "nodePool": {"topologySpreadConstraints": [spread]},
              "terminationGracePeriodSeconds": 120,
              "extraVolumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband"}}],
              "extraVolumeMounts": [{"name": "ib", "mountPath": "/dev/infiniband"}]}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    (job,) = [obj for _, obj in template("-f", str(path)) if obj["kind"] in ("PyTorchJob", "TrainJob")]
    assert crd_problems(job) == []
    if api == "pytorchjob":
        pods = [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
    else:
        pods = [j["template"]["spec"]["template"]["spec"] for p in job["spec"]["runtimePatches"]
                for j in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
    assert pods
    envs = [pod["containers"][0]["env"] for pod in pods] if api == "pytorchjob" else [job["spec"]["trainer"]["env"]]
    for env in envs:
        assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "115"} in env
    for pod in pods:
        assert pod["terminationGracePeriodSeconds"] == 120
        if api == "pytorchjob":  # a TrainJob's runtime decides these (datctl warns that they are not applied)
            assert pod["runtimeClassName"] == "nvidia" and pod["topologySpreadConstraints"] == [spread]
        assert {"name": "ib", "hostPath": {"path": "/dev/infiniband"}} in pod["volumes"]
        assert {"name": "ib", "mountPath": "/dev/infiniband"} in pod["containers"][0]["volumeMounts"]
    path.write_text(yaml.safe_dump({"api": api, "extraVolumes": [{"name": "tmp", "emptyDir": {}}]}))
    proc = helm("template", "run", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0 and 'extraVolumes: the name "tmp" is the chart\'s own volume' in proc.stderr


def test_a_monitoring_release_installs_the_shared_objects_and_no_run(tmp_path: Path) -> None:
    """job.enabled false: the dashboard, the alerts on every job and the exporter (with its NetworkPolicy), and
    nothing of a run; refused with one line where it would watch or install nothing; datctl refuses it."""
    objects = template("-f", str(MONITORING), "--api-versions", chart.MONITORING_API,
                       "--api-versions", f"{chart.MONITORING_API}/PrometheusRule")
    by_component = sorted((obj["metadata"]["labels"][chart.COMPONENT], obj["kind"]) for _, obj in objects)
    assert by_component == sorted([("dashboard", "ConfigMap"), ("alerts", "PrometheusRule"),
                                   *[("exporter", k) for k in ("ServiceAccount", "Role", "RoleBinding", "Service",
                                                               "Deployment", "PodMonitor", "NetworkPolicy")]])
    rules = next(obj for _, obj in objects if obj["kind"] == "PrometheusRule")
    assert "job_name=" not in json.dumps(rules)  # scope all: no selector on one job
    for values, why in ((["--set", "job.enabled=false"], "alerts.scope=release would watch this release's job"),
                        (["--set", "job.enabled=false", "--set", "alerts.enabled=false", "--set",
                          "dashboard.enabled=false"], "this release would install nothing"),
                        (["--set", "job.enabled=false", "--set", "alerts.scope=all", "--set",  # alerts auto, no CRD
                          "dashboard.enabled=false"], "this release would install nothing"),
                        (["-f", str(MONITORING), "--set", f"name={'m' * 55}"],  # no pod name to check it: Service
                         f"the exporter's Service and Deployment \"{'m' * 55}-exporter\" exceed 63 characters")):
        proc = helm("template", "run", str(CHART), *values, check=False)
        assert proc.returncode != 0 and why in proc.stderr
    assert cli.main(["render", str(MONITORING), "--set", "name=mon", "-o", str(tmp_path)]) == 2
