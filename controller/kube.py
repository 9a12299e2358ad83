"""Cluster operations of datctl with the kubernetes client: submit, status, watch, logs, delete.

API failures become one-line ClusterError messages: CRD not installed (404 on the API group), RBAC (403),
a job that does not exist, an unreachable API server, a missing kubeconfig.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from trainer import exits
from trainer.observability import RANK_LABELS  # labels of every trainer metric
from trainer.yamlfile import describe_yaml_error

OPERATOR_INSTALL = ("install the Kubeflow training operator v1.9: kubectl apply --server-side -k "
                    "\"github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4\"")
TRAINER_INSTALL = "install Kubeflow Trainer v2 (https://www.kubeflow.org/docs/components/trainer/)"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    version: str
    plural: str
    succeeded: str  # terminal success condition
    install: str
    suspend_path: tuple[str, ...] = ()  # where the job's suspend flag lives

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


PYTORCHJOB = Kind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "Succeeded", OPERATOR_INSTALL,
                  ("spec", "runPolicy", "suspend"))
TRAINJOB = Kind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "Complete", TRAINER_INSTALL,
                ("spec", "suspend"))
PODMONITOR = Kind("PodMonitor", "monitoring.coreos.com", "v1", "podmonitors", "",
                  "install the prometheus-operator CRDs, or set metrics.podMonitor: false")
KINDS = {"pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}


KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_GATE = "kueue.x-k8s.io/admission-gated-by"  # Kueue does not admit a job while it has this (Kueue >= 0.19)
DATCTL_GATE = "dat-k8s.io/datctl"


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def hold(job: dict[str, Any], kind: Kind) -> dict[str, Any]:
    """The job as submit creates it: suspended, and gated for Kueue (inert where Kueue is not installed)."""
    held = copy.deepcopy(job)
    held["metadata"]["annotations"] = {**(held["metadata"].get("annotations") or {}), KUEUE_GATE: DATCTL_GATE}
    parent = held
    for key in kind.suspend_path[:-1]:
        parent = parent.setdefault(key, {})
    parent[kind.suspend_path[-1]] = True
    return held


def kueue_queue(job: dict[str, Any]) -> str | None:
    """The LocalQueue of a job Kueue manages: the spec's scheduling.kueueQueue, or the one Kueue's webhook gave it."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE)


def release(created: dict[str, Any], kind: Kind) -> dict[str, Any]:
    """The merge patch that releases the held job, as the cluster created it: without datctl's Kueue gate, and
    not suspended unless Kueue manages it (Kueue unsuspends it once it admits it)."""
    patch: dict[str, Any] = {"metadata": {"annotations": {KUEUE_GATE: None}}}
    if not kueue_queue(created):
        patch["spec"] = _nested(kind.suspend_path[1:], False)
    return patch


class ClusterError(RuntimeError):
    """A cluster-side failure, one line; status is the API server's HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JobNotFound(ClusterError):
    """The job (or its kind's CRD) is not there: a 404 on the job itself."""


class KubeconfigError(ClusterError):
    """A mistake in --kubeconfig, --context or the kubeconfig file itself (a user mistake), one line."""


def check_kubeconfig(kubeconfig: str | None, context: str | None) -> None:
    """What the kubernetes client would report as a traceback or a misleading message, as one line: a
    --kubeconfig file that does not exist, a kubeconfig that is not YAML or not a mapping, an unknown --context.
    Without --kubeconfig the files are $KUBECONFIG's (the existing ones, as the client merges them), else
    ~/.kube/config; none at all is left to the client (in-cluster config, or its own error)."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.exists():
            raise KubeconfigError(f"--kubeconfig {kubeconfig}: the file does not exist")
        if not path.is_file():
            raise KubeconfigError(f"--kubeconfig {kubeconfig}: not a file")
        paths = [path]
    else:
        names = os.environ.get("KUBECONFIG", "").split(os.pathsep) if os.environ.get("KUBECONFIG") else \
            ["~/.kube/config"]
        paths = [Path(n).expanduser() for n in names if n and Path(n).expanduser().is_file()]
    contexts: list[str] = []
    docs: list[dict] = []
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise KubeconfigError(f"kubeconfig {path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KubeconfigError(f"kubeconfig {path}: not a text file") from None
        except yaml.YAMLError as exc:
            raise KubeconfigError(f"kubeconfig {path}: {describe_yaml_error(exc)}") from None
        if doc is None:
            continue  # empty: the client says so
        if not isinstance(doc, dict):
            raise KubeconfigError(f"kubeconfig {path}: not a kubeconfig (a mapping with clusters, users and "
                                  f"contexts), got {type(doc).__name__}")
        contexts += [c["name"] for c in doc.get("contexts") or [] if isinstance(c, dict) and c.get("name")]
        docs.append(doc)
    if context and paths and context not in contexts:
        known = ", ".join(dict.fromkeys(contexts)) or "none"
        raise KubeconfigError(f"context {context!r} not in kubeconfig {os.pathsep.join(map(str, paths))} "
                              f"(contexts: {known})")
    _check_auth_plugin(docs, context)


def _check_auth_plugin(docs: list[dict], context: str | None) -> None:
    """The context's user authenticates with an exec plugin (gke-gcloud-auth-plugin, aws, kubelogin) that is
    not installed: the client would log a traceback-like line and then report rejected credentials."""
    def entries(section: str) -> dict[str, dict]:
        return {e["name"]: e.get(section[:-1]) or {} for d in docs for e in d.get(section) or []
                if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get(section[:-1]), dict)}

    name = context or next((d.get("current-context") for d in docs if d.get("current-context")), None)
    user = entries("contexts").get(name or "", {}).get("user")
    command = (entries("users").get(user or "", {}).get("exec") or {}).get("command")
    if isinstance(command, str) and command and not shutil.which(command):
        raise KubeconfigError(f"kubeconfig user {user!r} signs in with the exec plugin {command!r}, which is not "
                              "installed or not on PATH (e.g. gke-gcloud-auth-plugin, aws, kubelogin)")


def _status_message(exc: ApiException) -> tuple[dict[str, Any] | None, str]:
    try:
        status = json.loads(exc.body or "")
    except ValueError:
        return None, (exc.body or exc.reason or "").strip()
    if isinstance(status, dict) and status.get("kind") == "Status":
        return status, status.get("message", "")
    return None, str(exc.reason)


class Cluster:
    """The API server named by a kubeconfig (or the in-cluster service account)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None,
                 namespace: str | None = None, request_timeout: float = 30.0) -> None:
        self.request_timeout = request_timeout  # per API call: a silent server must not hang datctl
        configuration = client.Configuration()
        check_kubeconfig(kubeconfig, context)
        try:
            try:
                config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if context:
                    active = next((c for c in contexts if c["name"] == context), active)
                default_namespace = (active or {}).get("context", {}).get("namespace") or "default"
            except config.ConfigException:
                if kubeconfig or not SA_NAMESPACE.exists():
                    raise
                config.load_incluster_config(client_configuration=configuration)  # in a pod, no kubeconfig
                default_namespace = SA_NAMESPACE.read_text().strip() or "default"
        except (config.ConfigException, OSError) as exc:
            env = os.environ.get("KUBECONFIG")
            if not kubeconfig and env and not any(Path(n).expanduser().is_file() for n in env.split(os.pathsep) if n):
                raise KubeconfigError(f"no usable Kubernetes config: KUBECONFIG={env} names no existing file; "
                                      "fix KUBECONFIG or pass --kubeconfig") from None
            raise KubeconfigError(f"no usable Kubernetes config ({exc}); set KUBECONFIG or pass "
                                  "--kubeconfig") from None
        configuration.retries = urllib3.Retry(total=2, connect=2, read=0, backoff_factor=0.2, status=0)
        self.host = configuration.host
        self.namespace = namespace or default_namespace
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # -- error translation ---------------------------------------------------------------------------------
    def call(self, kind: Kind | None, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs); API failures become ClusterError with a message naming `what`."""
        kwargs.setdefault("_request_timeout", self.request_timeout)
        not_kubernetes = ClusterError(f"{what}: the server at {self.host} did not answer as a Kubernetes API "
                                      "server (not JSON): check the kubeconfig's server URL")
        try:
            result = fn(*args, **kwargs)
        except ApiException as exc:
            raise ClusterError(self._explain(exc, kind, what), status=exc.status) from None
        except json.JSONDecodeError:  # an HTML login page of a proxy, a wrong server URL
            raise not_kubernetes from None
        except ValueError as exc:  # the client's own model check of an object (or of an answer)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise ClusterError(f"{what}: the kubernetes client refused it: {' '.join(lines[:3])[:300]}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            timed_out = [e for e in (exc, reason) if isinstance(e, urllib3.exceptions.TimeoutError)
                         and not isinstance(e, urllib3.exceptions.NewConnectionError)]  # refused: a subclass
            if timed_out:
                raise ClusterError(f"{what}: the Kubernetes API server at {self.host} did not answer within "
                                   f"{self.request_timeout:g} s (--request-timeout)") from None
            raise ClusterError(f"cannot reach the Kubernetes API server at {self.host}: {reason}") from None
        if kind is not None and isinstance(result, (str, bytes)):  # a custom object arrives as a dict
            raise not_kubernetes
        return result

    def _explain(self, exc: ApiException, kind: Kind | None, what: str) -> str:
        status, message = _status_message(exc)
        if exc.status == 0:
            return f"cannot reach the Kubernetes API server at {self.host}: {exc.reason}"
        if exc.status == 401:
            return f"{what}: unauthorized: the API server rejected the kubeconfig credentials ({message})"
        if exc.status == 403:
            return f"{what}: forbidden by RBAC: {message}"
        if exc.status == 404:
            if status is None and kind is not None:  # "404 page not found": the API group is not served
                return (f"{what}: the {kind.kind} CRD ({kind.api_version}) is not installed in the cluster; "
                        f"{kind.install}")
            return f"{what}: {message or 'not found'}"
        if exc.status == 409:
            return f"{what}: {message} (delete it first: datctl delete NAME)"
        return f"{what}: rejected by the API server ({exc.status} {exc.reason}): {message}"

    # -- discovery -----------------------------------------------------------------------------------------
    def serves(self, kind: Kind) -> bool:
        """Whether the API server serves this kind's group/version (its CRD is installed)."""
        try:
            resources = self.call(kind, f"discovery of {kind.api_version}", self.custom.get_api_resources,
                                  kind.group, kind.version)
        except ClusterError as exc:
            if "is not installed" in str(exc):
                return False
            raise
        return any(r.name == kind.plural for r in resources.resources or [])

    # -- objects -------------------------------------------------------------------------------------------
    def get_job(self, kind: Kind, name: str) -> dict[str, Any]:
        return self._job_call(kind, name, self.custom.get_namespaced_custom_object)

    def _job_call(self, kind: Kind, name: str, fn: Callable, **kwargs: Any) -> Any:
        try:
            return self.call(kind, f"{kind.kind} {self.namespace}/{name}", fn, kind.group, kind.version,
                             self.namespace, kind.plural, name, **kwargs)
        except ClusterError as exc:
            if exc.status == 404:
                raise JobNotFound(str(exc), status=404) from None
            raise

    def find_job(self, name: str, verb: Callable[[Kind, str], Any] | None = None) -> tuple[Kind, Any]:
        """verb(kind, name) (default get_job) on the PyTorchJob NAME, else on the TrainJob NAME: for commands
        not told the --api. Returns the kind and what verb returned."""
        verb = verb or self.get_job
        try:
            return PYTORCHJOB, verb(PYTORCHJOB, name)
        except ClusterError as not_pytorchjob:
            if not (isinstance(not_pytorchjob, JobNotFound) or not_pytorchjob.status == 403):
                raise  # (403: a user allowed TrainJobs only)
            try:
                return TRAINJOB, verb(TRAINJOB, name)
            except JobNotFound as not_trainjob:
                if not isinstance(not_pytorchjob, JobNotFound):  # PyTorchJobs forbidden, no such TrainJob
                    raise ClusterError(f"{not_pytorchjob} (nor is there a TrainJob {name})", status=403) from None
                if all("is not installed" in str(e) for e in (not_pytorchjob, not_trainjob)):
                    raise JobNotFound(f"neither the PyTorchJob CRD ({PYTORCHJOB.api_version}) nor the TrainJob CRD "
                                      f"({TRAINJOB.api_version}) is installed in the cluster; {PYTORCHJOB.install}",
                                      status=404) from None
                raise JobNotFound(f"no PyTorchJob or TrainJob named {name} in namespace {self.namespace}",
                                  status=404) from None
            except ClusterError as exc:  # e.g. RBAC forbids TrainJobs: both answers count
                raise ClusterError(f"{not_pytorchjob}; {exc}", status=exc.status) from None

    def submit(self, objects: list[dict[str, Any]], kind: Kind, out: IO[str] | None = None) -> dict[str, Any]:
        """Create the job held (suspended, and gated for Kueue), then its ConfigMap, a TrainJob's ServiceAccount,
        the NetworkPolicy and the PodMonitor (those given) owned by it, then release it.

        No pod starts before its config and NetworkPolicy exist, the job's deletion removes the rest (garbage
        collection), and a failed submit deletes just the job: so the user needs only create on those kinds, never
        patch or delete (RBAC cannot name objects that do not exist yet). Server-side dry runs of everything first
        catch a missing CRD, RBAC, the operator's webhook and admission before anything is created."""
        out = out or sys.stdout
        job = next(o for o in objects if o["kind"] == kind.kind)
        job = hold(job, kind)
        name, ns = job["metadata"]["name"], self.namespace
        what = f"{kind.kind} {ns}/{name}"
        custom = self.custom
        self.call(kind, f"{what} (dry run)", custom.create_namespaced_custom_object, kind.group, kind.version, ns,
                  kind.plural, job, dry_run="All")
        owned = [o for o in objects if o["kind"] in self._core_calls()]
        owned.sort(key=lambda o: o["kind"] != "NetworkPolicy")  # the policy first: it guards the job's pods
        monitors = [o for o in objects if o["kind"] == PODMONITOR.kind]
        for monitor in monitors:  # a PodMonitor the cluster refuses must not leave a job running unwatched
            self.call(PODMONITOR, f"PodMonitor {ns}/{name} (dry run)", custom.create_namespaced_custom_object,
                      PODMONITOR.group, PODMONITOR.version, ns, PODMONITOR.plural, monitor, dry_run="All")
        for obj in owned:  # RBAC, quota, admission, and a leftover of the same name, before anything exists
            try:
                self._create(obj, dry_run="All")
            except ClusterError as exc:
                raise ClusterError(_owned_refused(obj, exc, ns, name), status=exc.status) from None
        created = self.call(kind, what, custom.create_namespaced_custom_object, kind.group, kind.version, ns,
                            kind.plural, job)
        print(f"{kind.kind.lower()}/{name} created (suspended until its objects exist)", file=out)
        owner = {"apiVersion": kind.api_version, "kind": kind.kind, "name": name,
                 "uid": created["metadata"]["uid"], "controller": True, "blockOwnerDeletion": False}
        try:
            if not _dig(created, kind.suspend_path):
                raise ClusterError(f"{what}: the cluster dropped {'.'.join(kind.suspend_path)} (a {kind.kind} CRD "
                                   f"older than the one datctl is written for), so the job could start before "
                                   f"its objects exist; {kind.install}")
            for obj in owned + monitors:
                obj = {**obj, "metadata": {**obj["metadata"], "ownerReferences": [owner]}}
                if obj["kind"] == PODMONITOR.kind:
                    self.call(PODMONITOR, f"PodMonitor {ns}/{name}", custom.create_namespaced_custom_object,
                              PODMONITOR.group, PODMONITOR.version, ns, PODMONITOR.plural, obj)
                else:
                    self._create(obj)
                print(f"{obj['kind'].lower()}/{obj['metadata']['name']} created", file=out)
            self.call(kind, f"{what} (release)", custom.patch_namespaced_custom_object, kind.group, kind.version,
                      ns, kind.plural, name, release(created, kind))
        except (ClusterError, KeyboardInterrupt) as exc:  # leave nothing behind: what was created goes with the job
            try:
                self.delete(kind, name)
            except ClusterError as also:
                raise ClusterError(f"{exc or 'interrupted'}; and deleting the held {kind.kind} failed too ({also}): "
                                   f"datctl delete {name} -n {ns}", status=getattr(exc, "status", None)) from None
            raise
        queue = kueue_queue(created)
        print(f"{kind.kind.lower()}/{name} " + (f"released to Kueue LocalQueue {queue} (it starts the job once "
                                                 "admitted)" if queue else "released"), file=out)
        return created

    def _core_calls(self) -> dict[str, Callable]:
        """The create calls for the built-in kinds a rendered job comes with."""
        return {"NetworkPolicy": client.NetworkingV1Api(self.api).create_namespaced_network_policy,
                "ConfigMap": self.core.create_namespaced_config_map,
                "ServiceAccount": self.core.create_namespaced_service_account}

    def _create(self, obj: dict[str, Any], **kwargs: Any) -> Any:
        dry_run = " (dry run)" if kwargs.get("dry_run") else ""
        return self.call(None, f"{obj['kind']} {self.namespace}/{obj['metadata']['name']}{dry_run}",
                         self._core_calls()[obj["kind"]], self.namespace, obj, **kwargs)

    def delete(self, kind: Kind, name: str) -> None:
        self._job_call(kind, name, self.custom.delete_namespaced_custom_object, propagation_policy="Background")

    def wait_deleted(self, kind: Kind, name: str, timeout: float, interval: float = 1.0) -> bool:
        """Until the job and its ConfigMap (garbage-collected after it) are gone, as kubectl delete waits: a
        submit of the same name meanwhile would find them. False if either is still there after timeout s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get_job(kind, name)
            except JobNotFound:
                try:
                    self.call(None, f"ConfigMap {self.namespace}/{name}-config", self.core.read_namespaced_config_map,
                              f"{name}-config", self.namespace)
                except ClusterError as exc:
                    if exc.status == 404:
                        return True
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def pods(self, kind: Kind, name: str, replica: str | None = None) -> list[client.V1Pod]:
        selector = pod_selector(kind, name, replica)
        pods = self.call(None, f"pods of {kind.kind} {self.namespace}/{name}", self.core.list_namespaced_pod,
                         self.namespace, label_selector=selector)
        return sorted(pods.items, key=lambda p: p.metadata.name)

    def logs(self, kind: Kind, name: str, replica: str, follow: bool, out: IO[str]) -> None:
        pods = self.pods(kind, name, replica)
        if not pods:
            raise ClusterError(f"{kind.kind} {self.namespace}/{name}: no pod for replica {replica}")
        pod = pods[0].metadata.name
        container = "pytorch" if kind is PYTORCHJOB else "node"
        stream = self.call(None, f"logs of pod {self.namespace}/{pod}", self.core.read_namespaced_pod_log,
                           pod, self.namespace, container=container, follow=follow, _preload_content=False,
                           _request_timeout=(self.request_timeout, None) if follow else self.request_timeout)
        try:
            for chunk in stream.stream(4096):
                out.write(chunk.decode(errors="replace"))
                out.flush()
        finally:
            stream.release_conn()

    def configured_metrics_port(self, name: str) -> int | None:
        """metrics.port of the trainer config in the job's ConfigMap (<name>-config, as datctl and the chart
        create it); None when there is none or it cannot be read."""
        try:
            cm = self.call(None, f"ConfigMap {self.namespace}/{name}-config", self.core.read_namespaced_config_map,
                           f"{name}-config", self.namespace)
            port = (yaml.safe_load((cm.data or {}).get("config.yaml") or "") or {}).get("metrics", {}).get("port")
        except (ClusterError, yaml.YAMLError, AttributeError):
            return None
        return int(port) if isinstance(port, int) and port > 0 else None

    def scrape(self, pod: str, port: int) -> str:
        """GET /metrics of a pod through the API server's pod proxy (works from outside the cluster)."""
        return self.call(None, f"metrics of pod {self.namespace}/{pod}",
                         self.core.connect_get_namespaced_pod_proxy_with_path,
                         f"{pod}:{port}", self.namespace, "metrics", _request_timeout=5)


def _owned_refused(obj: dict[str, Any], exc: ClusterError, namespace: str, job: str) -> str:
    """The dry run's refusal of an object created with the job, with what to do about it."""
    if exc.status == 409:
        return (f"{obj['kind']} {namespace}/{obj['metadata']['name']} already exists: left by an earlier job "
                f"{job} that Kubernetes is still deleting (retry in a few seconds), or another's (choose another "
                f"job name)")
    if obj["kind"] == "ServiceAccount" and exc.status == 403 and "quota" not in str(exc):  # RBAC, not a quota
        return (f"{exc}; set serviceAccountName in the spec to an existing ServiceAccount (one without a token: "
                "automountServiceAccountToken: false)")
    return str(exc)


def pod_selector(kind: Kind, name: str, replica: str | None = None) -> str:
    """Label selector of a job's pods; replica like master-0, worker-3 (PyTorchJob) or node-1 (TrainJob)."""
    if kind is PYTORCHJOB:
        parts = [f"training.kubeflow.org/job-name={name}"]
        if replica:
            rtype, _, index = replica.rpartition("-")
            parts += [f"training.kubeflow.org/replica-type={rtype}", f"training.kubeflow.org/replica-index={index}"]
    else:
        parts = [f"jobset.sigs.k8s.io/jobset-name={name}"]
        if replica:
            rjob, _, index = replica.rpartition("-")
            parts += [f"jobset.sigs.k8s.io/replicatedjob-name={rjob}",
                      f"batch.kubernetes.io/job-completion-index={index}"]
    return ",".join(parts)


def default_replica(kind: Kind, job: dict[str, Any] | None = None) -> str:
    if kind is TRAINJOB:
        return "node-0"
    specs = ((job or {}).get("spec") or {}).get("pytorchReplicaSpecs") or {"Master": {}}
    return "master-0" if "Master" in specs else "worker-0"


def metrics_port(job: dict[str, Any]) -> int | None:
    for rspec in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values():
        for container in rspec["template"]["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    return int(port["containerPort"])
    return None


# ---- presentation -----------------------------------------------------------------------------------------

def condition_lines(job: dict[str, Any]) -> list[str]:
    out = []
    for c in (job.get("status") or {}).get("conditions") or []:
        line = f"  {c.get('type', '?'):<11} {c.get('status', '?'):<6} {c.get('lastTransitionTime', ''):<21}"
        detail = " ".join(x for x in (c.get("reason"), c.get("message")) if x)
        out.append(f"{line} {detail}".rstrip())
    return out or ["  (none yet)"]


def phase(job: dict[str, Any], kind: Kind) -> str:
    """Failed or the success condition once true, else the latest true condition (Created, Running, ...)."""
    true = [c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for terminal in ("Failed", kind.succeeded):
        if terminal in true:
            return terminal
    return true[-1] if true else "Pending"


def epoch_figures(text: str) -> list[str]:
    """The trainer's rank-0 gauges (latest epoch, accuracies, throughput, ...) from a /metrics scrape; none
    before the first epoch has ended (the trainer exports epoch 0, its start time and a heartbeat from the
    start). Timestamps as UTC times."""
    lines, epoch = [], None
    for family in text_string_to_metric_families(text):
        if family.type != "gauge" or not family.name.startswith("dat_") or family.name == "dat_run_info":
            continue
        for sample in family.samples:
            if sample.labels.get("rank", "0") != "0":
                continue
            if sample.name == "dat_epoch":
                epoch = sample.value
            extra = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in RANK_LABELS)
            value = (datetime.fromtimestamp(sample.value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                     if sample.name.endswith("_timestamp_seconds") else f"{sample.value:g}")
            lines.append(f"  {sample.name + (f'{{{extra}}}' if extra else ''):<48} {value}")
    return [] if epoch == 0 else lines


def exit_note(pod: Any) -> str:
    """How the pod's trainer container last ended, in words: its exit status now (a finished or failed pod)
    or before its latest restart; '' while it never ended."""
    for container in pod.status.container_statuses or []:
        for when, state in (("exited", container.state), ("last exit", container.last_state)):
            ended = state.terminated if state else None
            if ended is not None:
                return f"  {when} {ended.exit_code}: {exits.describe(ended.exit_code, ended.reason)}"
    return ""


def status_report(cluster: Cluster, kind: Kind, name: str, job: dict[str, Any] | None = None) -> list[str]:
    """job: the job as just read, if it was."""
    job = job if job is not None else cluster.get_job(kind, name)
    out = [f"{kind.kind} {cluster.namespace}/{name}: {phase(job, kind)}", "conditions:"]
    out += condition_lines(job)
    status = job.get("status") or {}
    if status.get("replicaStatuses"):  # PyTorchJob: pods per replica type
        out.append("replicas:")
        for rtype, counts in sorted(status["replicaStatuses"].items()):
            figures = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("active", "succeeded", "failed"))
            out.append(f"  {rtype:<7} {figures}")
    if status.get("jobsStatus"):  # TrainJob: the JobSet's Jobs per replicated job
        out.append("jobs:")
        for counts in status["jobsStatus"]:
            figures = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("active", "ready", "succeeded", "failed",
                                                                      "suspended"))
            out.append(f"  {counts.get('name', '?'):<7} {figures}")
    pods = cluster.pods(kind, name)
    if pods:
        out.append("pods:")
        for pod in pods:
            restarts = sum(s.restart_count for s in (pod.status.container_statuses or []))
            out.append(f"  {pod.metadata.name:<40} {pod.status.phase or '?':<10} restarts {restarts}"
                       f"{'  node ' + pod.spec.node_name if pod.spec and pod.spec.node_name else ''}"
                       f"{exit_note(pod)}")
    # rank 0 serves the epoch figures: master-0 / node-0, found by the labels the operator gives its pod
    wanted = dict(part.split("=", 1) for part in pod_selector(kind, name, default_replica(kind, job)).split(","))
    first = next((p for p in pods if wanted.items() <= (p.metadata.labels or {}).items()), None)
    if first is not None and first.status.phase == "Running":
        port = metrics_port(job) if kind is PYTORCHJOB else cluster.configured_metrics_port(name)
        main = first.metadata.name
    else:
        port = None
    if port:
        try:
            figures = epoch_figures(cluster.scrape(main, port))
            out += [f"latest epoch ({main}:{port}/metrics):"] + (figures or ["  (no epoch finished yet)"])
        except ClusterError as exc:
            out.append(f"metrics: not reachable ({exc}; with networkPolicy.enabled, metricsFrom must let the API "
                       "server's proxy in)")
    return out


def watch(cluster: Cluster, kind: Kind, name: str, interval: float, timeout: float,
          out: IO[str] | None = None, job: dict[str, Any] | None = None, started: float | None = None) -> bool:
    """Print condition changes until the job ends; True when it succeeded. job: its first poll, if read;
    started: the time.monotonic() the timeout counts from (default: now)."""
    out = out or sys.stdout
    seen: set[tuple] = set()
    deadline = (started or time.monotonic()) + timeout if timeout > 0 else None
    while True:
        job = job if job is not None else cluster.get_job(kind, name)
        for c in (job.get("status") or {}).get("conditions") or []:
            key = (c.get("type"), c.get("status"), c.get("reason"), c.get("lastTransitionTime"))
            if key not in seen:
                seen.add(key)
                # a condition turned False keeps its old reason and message: leave them out
                detail = " ".join(x for x in (c.get("reason"), c.get("message")) if x) if c.get("status") == "True" else ""
                print(f"{c.get('lastTransitionTime', '')} {c.get('type')}={c.get('status')} {detail}".strip(),
                      file=out, flush=True)
        current = phase(job, kind)
        if current == kind.succeeded:
            return True
        if current == "Failed":
            return False
        if deadline is not None and time.monotonic() >= deadline:
            raise ClusterError(f"{kind.kind} {cluster.namespace}/{name}: still {current} after {timeout:g}s")
        time.sleep(interval)
        job = None
