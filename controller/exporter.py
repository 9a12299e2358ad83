"""``datctl exporter``: job-level Prometheus metrics for Kubeflow PyTorchJobs and TrainJobs.

Lists and then watches the jobs of each kind asked for (all namespaces or one) and serves, per job:
  dat_job_condition{kind,condition}            1 while that condition's status is True, else 0
                                               PyTorchJob: Created, Running, Restarting, Succeeded, Suspended, Failed
                                               TrainJob: Created, Suspended, Complete, Failed
  dat_job_start_timestamp_seconds{kind}        PyTorchJob status.startTime (a TrainJob's status has none)
  dat_job_completion_timestamp_seconds{kind}   PyTorchJob status.completionTime, else (and for a TrainJob)
                                               when Succeeded / Complete or Failed turned True
  dat_job_replicas{kind,replica,state}         PyTorchJob status.replicaStatuses (master, worker: active,
                                               succeeded, failed); TrainJob status.jobsStatus (node, initializers:
                                               active, ready, succeeded, failed, suspended)
  dat_job_restarts_total{kind}                 PyTorchJob: Restarting transitions this exporter has seen
Labels ``job_namespace`` and ``job_name`` name the job: ``namespace`` and ``job`` are the labels Prometheus
gives the exporter's own target, which would rename clashing labels to ``exported_*``. One dashboard and one
set of alerts thus serve both APIs.

A watch that expires (410 Gone), fails, or loses its connection is followed by a fresh list and watch,
with exponential back-off on errors; the process never exits on API errors.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controller import kube
from trainer.observability import serve_metrics

JOB_LABELS = ["job_namespace", "job_name", "kind"]

log = logging.getLogger("datctl.exporter")


@dataclass(frozen=True)
class Exported:
    """What the exporter reads from one job kind's status."""
    resource: kube.Kind
    conditions: tuple[str, ...]
    replica_states: tuple[str, ...]
    restarts: bool  # the kind reports restarts as a Restarting condition

    def replicas(self, status: dict[str, Any]) -> dict[str, dict[str, int]]:
        if self.resource is kube.TRAINJOB:
            groups = {g.get("name", ""): g for g in status.get("jobsStatus") or []}
        else:
            groups = {rtype.lower(): counts for rtype, counts in (status.get("replicaStatuses") or {}).items()}
        return {name: {state: int((counts or {}).get(state) or 0) for state in self.replica_states}
                for name, counts in groups.items()}

    def times(self, status: dict[str, Any], conditions: dict[str, dict]) -> tuple[float | None, float | None]:
        """(start, completion) as Unix times: PyTorchJob status.startTime and status.completionTime; the end
        is otherwise when the success or Failed condition turned True (a TrainJob's status has no times)."""
        ended = [c.get("lastTransitionTime") for t, c in conditions.items()
                 if t in (self.resource.succeeded, "Failed") and str(c.get("status")) == "True"]
        return (_timestamp(status.get("startTime")),
                _timestamp(status.get("completionTime")) or _timestamp(ended[0] if ended else None))


EXPORTED = {
    "pytorchjob": Exported(kube.PYTORCHJOB, ("Created", "Running", "Restarting", "Succeeded", "Suspended", "Failed"),
                           ("active", "succeeded", "failed"), restarts=True),
    "trainjob": Exported(kube.TRAINJOB, ("Created", "Suspended", "Complete", "Failed"),
                         ("active", "ready", "succeeded", "failed", "suspended"), restarts=False),
}


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class JobState:
    namespace: str
    name: str
    uid: str
    conditions: dict[str, bool]
    start: float | None
    completion: float | None
    replicas: dict[str, dict[str, int]]
    restart_marks: set[str] = field(default_factory=set)  # lastTransitionTime of each Restarting seen

    @classmethod
    def from_object(cls, obj: dict[str, Any], exported: Exported) -> "JobState":
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        seen = {c.get("type"): c for c in status.get("conditions") or [] if c.get("type") in exported.conditions}
        conditions = {c: c in seen and str(seen[c].get("status")) == "True" for c in exported.conditions}
        start, completion = exported.times(status, seen)
        job = cls(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
                  conditions=conditions, start=start, completion=completion, replicas=exported.replicas(status))
        if exported.restarts and conditions.get("Restarting"):
            restarting = seen["Restarting"]
            job.restart_marks.add(restarting.get("lastTransitionTime") or restarting.get("lastUpdateTime") or "?")
        return job


class JobStore:
    """The jobs of one kind as last seen by list and watch; safe to read from the scrape thread."""

    def __init__(self, exported: Exported) -> None:
        self.exported = exported
        self._jobs: dict[tuple[str, str], JobState] = {}
        self._lock = threading.Lock()

    def _merge(self, job: JobState) -> JobState:
        old = self._jobs.get((job.namespace, job.name))
        if old is not None and old.uid == job.uid:
            job.restart_marks |= old.restart_marks
        return job

    def upsert(self, obj: dict[str, Any]) -> None:
        job = JobState.from_object(obj, self.exported)
        with self._lock:
            self._jobs[(job.namespace, job.name)] = self._merge(job)

    def delete(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        with self._lock:
            self._jobs.pop((meta.get("namespace", ""), meta.get("name", "")), None)

    def replace(self, objs: Iterable[dict[str, Any]]) -> None:
        """After a (re-)list: exactly these jobs exist; deletions missed while not watching are dropped."""
        jobs = [JobState.from_object(o, self.exported) for o in objs]
        with self._lock:
            self._jobs = {(j.namespace, j.name): self._merge(j) for j in jobs}

    def snapshot(self) -> list[JobState]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.namespace, j.name))


@dataclass
class WatchStats:
    lists: int = 0
    events: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=lambda: {"expired": 0, "api": 0, "connection": 0})
    last_list: float = 0.0


class JobCollector:
    """Builds the metric families from the stores at every scrape."""

    def __init__(self, watched: list[tuple[JobStore, WatchStats]]) -> None:
        self.watched = watched

    def collect(self) -> Iterable[Any]:
        condition = GaugeMetricFamily("dat_job_condition", "1 while the job condition's status is True, else 0.",
                                      labels=JOB_LABELS + ["condition"])
        start = GaugeMetricFamily("dat_job_start_timestamp_seconds", "PyTorchJob status.startTime.",
                                  labels=JOB_LABELS)
        completion = GaugeMetricFamily("dat_job_completion_timestamp_seconds",
                                       "When the job succeeded or failed (PyTorchJob status.completionTime, else "
                                       "when its success or Failed condition turned True).", labels=JOB_LABELS)
        replicas = GaugeMetricFamily("dat_job_replicas", "Pods (PyTorchJob replicaStatuses) or Jobs (TrainJob "
                                     "jobsStatus) per replica and state.", labels=JOB_LABELS + ["replica", "state"])
        restarts = CounterMetricFamily("dat_job_restarts", "Restarting transitions seen by this exporter.",
                                       labels=JOB_LABELS)
        jobs = GaugeMetricFamily("dat_exporter_jobs", "Jobs currently known.", labels=["kind"])
        lists = CounterMetricFamily("dat_exporter_lists", "Full lists of the jobs (first one and re-lists).",
                                    labels=["kind"])
        events = CounterMetricFamily("dat_exporter_watch_events", "Watch events received.", labels=["kind", "type"])
        errors = CounterMetricFamily("dat_exporter_watch_errors", "Lists or watches that ended in an error: "
                                     "expired (410 Gone), api (other API error), connection.",
                                     labels=["kind", "reason"])
        last = GaugeMetricFamily("dat_exporter_last_list_timestamp_seconds", "Unix time of the last good list.",
                                 labels=["kind"])
        for store, stats in self.watched:
            kind, exported, known = store.exported.resource.kind, store.exported, store.snapshot()
            for job in known:
                ids = [job.namespace, job.name, kind]
                for cond in exported.conditions:
                    condition.add_metric(ids + [cond], 1.0 if job.conditions[cond] else 0.0)
                if job.start is not None:
                    start.add_metric(ids, job.start)
                if job.completion is not None:
                    completion.add_metric(ids, job.completion)
                for replica in sorted(job.replicas):
                    for state in exported.replica_states:
                        replicas.add_metric(ids + [replica, state], job.replicas[replica][state])
                if exported.restarts:
                    restarts.add_metric(ids, len(job.restart_marks))
            jobs.add_metric([kind], len(known))
            lists.add_metric([kind], stats.lists)
            for event, count in sorted(stats.events.items()):
                events.add_metric([kind, event], count)
            for reason, count in sorted(stats.errors.items()):
                errors.add_metric([kind, reason], count)
            last.add_metric([kind], stats.last_list)
        yield from (condition, start, completion, replicas, restarts, jobs, lists, events, errors, last)


class JobWatcher:
    """List, then watch from the list's resourceVersion; on any failure list again (with back-off)."""

    def __init__(self, api_client: Any, store: JobStore, stats: WatchStats, namespace: str = "",
                 watch_timeout: int = 300, retry_seconds: float = 1.0, max_retry_seconds: float = 30.0,
                 stop_event: threading.Event | None = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.store, self.stats, self.namespace = store, stats, namespace
        self.resource = store.exported.resource
        self.watch_timeout = watch_timeout
        self.retry_seconds, self.max_retry_seconds = retry_seconds, max_retry_seconds
        self.stop_event = stop_event or threading.Event()

    def _list_call(self) -> tuple[Callable[..., Any], tuple]:
        r = self.resource
        if self.namespace:
            return self.api.list_namespaced_custom_object, (r.group, r.version, self.namespace, r.plural)
        return self.api.list_cluster_custom_object, (r.group, r.version, r.plural)

    def list_jobs(self) -> str:
        func, args = self._list_call()
        result = func(*args, _request_timeout=60)
        self.store.replace(result.get("items") or [])
        self.stats.lists += 1
        self.stats.last_list = time.time()
        return (result.get("metadata") or {}).get("resourceVersion", "")

    def watch_jobs(self, resource_version: str) -> str:
        """Follow one watch until the server ends it; return the last resourceVersion seen."""
        from kubernetes import watch

        func, args = self._list_call()
        stream = watch.Watch()
        # timeout_seconds makes the server end the watch (and stops the client's own silent 410 retry);
        # the read timeout catches a connection that went quiet without closing.
        for event in stream.stream(func, *args, resource_version=resource_version, allow_watch_bookmarks=True,
                                   timeout_seconds=self.watch_timeout,
                                   _request_timeout=(30, self.watch_timeout + 30)):
            kind, obj = event["type"], event["raw_object"]
            self.stats.events[kind] = self.stats.events.get(kind, 0) + 1
            if kind in ("ADDED", "MODIFIED"):
                self.store.upsert(obj)
            elif kind == "DELETED":
                self.store.delete(obj)
            resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
            if self.stop_event.is_set():
                stream.stop()
        return resource_version

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = self.retry_seconds
        while not self.stop_event.is_set():
            try:
                rv = self.list_jobs()
                delay = self.retry_seconds
                while not self.stop_event.is_set():
                    rv = self.watch_jobs(rv)
            except ApiException as exc:
                if exc.status == 410:
                    self.stats.errors["expired"] += 1
                    log.info("watch expired (410 Gone); listing again")
                    continue
                reason = "connection" if not exc.status else "api"  # status 0: TLS or transport failure
                self.stats.errors[reason] += 1
                hint = f" ({self.resource.plural} not served: {self.resource.install})" if exc.status == 404 else ""
                log.warning("Kubernetes API error %s %s listing %s%s; retrying in %.1fs", exc.status, exc.reason,
                            self.resource.plural, hint, delay)
            except Exception as exc:  # dropped connections, timeouts, garbage: list again after a pause
                self.stats.errors["connection"] += 1
                log.warning("watch connection failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
            self.stop_event.wait(delay)
            delay = min(delay * 2, self.max_retry_seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", default="pytorchjob",
                        help="job kinds to watch, comma-separated: pytorchjob, trainjob (default pytorchjob)")
    parser.add_argument("--namespace", "-n", default="", help="watch one namespace (default: all namespaces)")
    parser.add_argument("--port", type=int, default=9469, help="port to serve /metrics on (default 9469)")
    parser.add_argument("--address", default="", help="address to serve on (default: every address, IPv4 and "
                        "IPv6, as the trainer serves)")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG / ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--watch-timeout", type=int, default=300,
                        help="seconds after which the API server ends each watch (default 300)")
    parser.add_argument("--retry-seconds", type=float, default=1.0,
                        help="first pause after an API error, doubled up to --max-retry-seconds")
    parser.add_argument("--max-retry-seconds", type=float, default=30.0)


def _api_client(kubeconfig: str | None, context: str | None) -> Any:
    import os

    from kubernetes import client, config

    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    kube.check_kubeconfig(kubeconfig, context)
    return config.new_client_from_config(config_file=kubeconfig, context=context)


def run(args: argparse.Namespace) -> int:
    """Serve job metrics until SIGTERM / SIGINT. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # our own line per failed attempt says it all; urllib3 would add its retry warnings to each
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    if not 0 < args.port < 65536:
        print(f"datctl exporter: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if not (args.watch_timeout >= 1 and 0 < args.retry_seconds <= args.max_retry_seconds < float("inf")):  # NaN too
        print("datctl exporter: --watch-timeout must be >= 1 and 0 < --retry-seconds <= --max-retry-seconds",
              file=sys.stderr)
        return 2
    apis = [a.strip() for a in args.api.split(",") if a.strip()]
    unknown = [a for a in apis if a not in EXPORTED]
    if unknown or not apis:
        print(f"datctl exporter: --api takes {', '.join(EXPORTED)} (comma-separated), got {args.api!r}",
              file=sys.stderr)
        return 2
    try:
        api_client = _api_client(args.kubeconfig, args.context)
    except kube.KubeconfigError as exc:
        print(f"datctl exporter: cannot load Kubernetes credentials: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # kubernetes.config.ConfigException, missing or unreadable files
        print(f"datctl exporter: cannot load Kubernetes credentials: {str(exc).splitlines()[0] if str(exc) else exc!r}",
              file=sys.stderr)
        return 2
    watched = [(JobStore(EXPORTED[api]), WatchStats()) for api in dict.fromkeys(apis)]
    registry = CollectorRegistry()
    registry.register(JobCollector(watched))
    try:
        if args.address:
            server, _ = start_http_server(args.port, addr=args.address, registry=registry)
        else:
            server = serve_metrics(args.port, registry)
    except OSError as exc:
        print(f"datctl exporter: cannot listen on {args.address or '*'}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for store, stats in watched:
        watcher = JobWatcher(api_client, store, stats, namespace=args.namespace, watch_timeout=args.watch_timeout,
                             retry_seconds=args.retry_seconds, max_retry_seconds=args.max_retry_seconds,
                             stop_event=stop)
        # A watch blocks in a socket read; keeping it off the main thread lets a signal end the process at once.
        threading.Thread(target=watcher.run, name=f"{watcher.resource.plural}-watch", daemon=True).start()
    scope = f"namespace {args.namespace}" if args.namespace else "all namespaces"
    kinds = ", ".join(store.exported.resource.kind for store, _ in watched)
    log.info("serving %s metrics of %s on %s:%d/metrics", kinds, scope, args.address or "*", args.port)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="datctl exporter", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
