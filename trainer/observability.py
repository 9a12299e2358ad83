"""Per-epoch Prometheus metrics for a training run: one scrape endpoint per pod, optional Pushgateway.

Every rank keeps its own registry and, at each epoch end (and every PROGRESS_SECONDS during an epoch, for
the progress heartbeat), writes it atomically to ``<metrics dir>/local-rank-<i>.prom``; local rank 0 serves
the union of those files on ``metrics.port``. Values that are the same on every rank (loss, accuracy, learning
rate, throughput, run settings) are exported by rank 0 only, so a job's series do not grow with its ranks
beyond the per-rank timings, bytes and heartbeats.
prometheus_client's multiprocess mode would do the sharing for us, but it is switched on process-wide
when prometheus_client is first imported (PROMETHEUS_MULTIPROC_DIR must be set before that) and keys
its files by pid, so it cannot be enabled by a library at run time; per-rank text files need neither.

Environment (all optional):
  DAT_JOB_NAME     the job's name (the chart and datctl set it); the fallbacks are the
                   pod hostname ``<job>-master-0`` / ``<job>-worker-<i>``, then the run name.
  DAT_NAMESPACE    the pod's namespace; added to the Pushgateway grouping key.
  DAT_METRICS_DIR  where the ranks of a pod exchange their metrics (default: a folder under $TMPDIR); it must
                   be this user's and writable by no one else (it feeds the endpoint).
"""
from __future__ import annotations

import errno
import os
import re
import socket
import sys
import tempfile
import time
from typing import Any, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (CollectorRegistry, Counter, Gauge, disable_created_metrics, push_to_gateway,
                               start_http_server)
from prometheus_client.exposition import write_to_textfile
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# The `phase` label of each trainer.metrics.PHASES entry (its metrics.jsonl key: <entry>_seconds). Written out,
# not imported: this module stays free of torch, as datctl's exporter (a 256 Mi pod) imports it.
PHASE_LABELS = {"data": "data", "attack": "attack", "compute": "compute", "comm": "communication",
                "optimizer": "optimizer", "eval": "eval", "checkpoint": "checkpoint"}
RANK_LABELS = ("job_name", "run_id", "rank", "local_rank", "node_rank")
OUTCOMES = ("completed", "diverged", "error", "stopped")
PROGRESS_SECONDS = 15.0  # the heartbeat's period: how stale dat_progress_timestamp_seconds gets while healthy
PUSH_PROGRESS_SECONDS = 60.0  # a Pushgateway gets the heartbeat this often (hundreds of ranks push to one)
_POD_HOSTNAME = re.compile(r"^(?P<job>[a-z]([-a-z0-9]*[a-z0-9])?)-(master|worker)-\d+$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def resolve_job_name(configured: str, default: str, env: dict[str, str] | None = None,
                     hostname: str | None = None) -> str:
    """metrics.job_name, else $DAT_JOB_NAME, else the job part of a PyTorchJob pod hostname, else default."""
    env = os.environ if env is None else env
    if configured:
        return configured
    if env.get("DAT_JOB_NAME"):
        return env["DAT_JOB_NAME"]
    host = hostname if hostname is not None else env.get("HOSTNAME") or socket.gethostname()
    match = _POD_HOSTNAME.match(host or "")
    if match:
        return match.group("job")
    return default


def _warn(message: str) -> None:
    print(f"[metrics] warning: {message}", file=sys.stderr, flush=True)


def serve_metrics(port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serves on every address of the pod: dual-stack "::" (IPv4 and IPv6 clusters alike), or IPv4 alone
    where the kernel has IPv6 off."""
    try:
        server, _ = start_http_server(port, addr="::", registry=registry)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        server, _ = start_http_server(port, addr="0.0.0.0", registry=registry)
    return server


class _RankFilesCollector:
    """Serves the metric families of every ``*.prom`` file in a folder, merged by family name."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(".prom"):
                continue
            try:
                with open(os.path.join(self.folder, name)) as fh:
                    text = fh.read()
            except FileNotFoundError:  # replaced or wiped between listdir and open
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    families[family.name] = family
                else:
                    merged.samples.extend(family.samples)
        return list(families.values())


class TrainingExporter:
    """Epoch-level training metrics of one rank; local rank 0 also serves the pod's endpoint."""

    clock = staticmethod(time.monotonic)  # what the heartbeat's throttling reads (tests give it their own)

    def __init__(self, *, registry: CollectorRegistry | None = None, job_name: str = "",
                 labels: dict[str, str] | None = None, rank_file: str = "", pushgateway: str = "",
                 push_grouping: dict[str, str] | None = None, server: Any = None,
                 grace_seconds: float = 0.0, job_wide: bool = True, world_size: int = 1) -> None:
        self.enabled = registry is not None
        self.job_name = job_name
        self.registry = registry
        self.rank_file = rank_file
        self.pushgateway = pushgateway
        self.push_grouping = push_grouping or {}
        self.server = server
        self.grace_seconds = grace_seconds
        self.job_wide = job_wide  # this rank exports the job-wide values (rank 0)
        self.world_size = world_size
        self._labels = labels or {}
        self._finished = False
        self._epochs_observed = 0  # by this process
        self._last_beat = self._last_push = self.clock()
        if self.enabled:
            self._define_metrics()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def start(cls, metrics_cfg, *, rank: int, local_rank: int, node_rank: int, world_size: int,
              local_world_size: int, run_info: dict[str, str], default_job_name: str,
              epochs_done: int = 0, run_id: str = "", history: Iterable[dict] = ()) -> "TrainingExporter":
        """Set up this rank's metrics; local rank 0 starts the pod's HTTP endpoint on metrics_cfg.port.
        history: the metrics.jsonl records of the epochs a resumed run has done, so that its job-wide gauges
        (accuracy at the last evaluation, loss, ...) are there from the start, as if the run had not stopped.

        With port 0 and no Pushgateway the returned exporter does nothing."""
        port = int(metrics_cfg.port)
        if port == 0 and not metrics_cfg.pushgateway:
            return cls()
        job_name = resolve_job_name(metrics_cfg.job_name, default_job_name)
        labels = {"job_name": job_name, "run_id": run_id, "rank": str(rank), "local_rank": str(local_rank),
                  "node_rank": str(node_rank)}
        disable_created_metrics()  # *_created series per counter: noise at hundreds of ranks, unused here
        registry = CollectorRegistry()
        rank_file = server = None
        if port:
            folder = os.environ.get("DAT_METRICS_DIR") or os.path.join(
                tempfile.gettempdir(), f"dat-metrics-port{port}-node{node_rank}")
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                owner = os.stat(folder)
                if owner.st_uid != os.getuid() or owner.st_mode & 0o022:
                    # another user's folder in a shared /tmp could feed this endpoint its own series
                    raise OSError(errno.EPERM, "it belongs to another user or others may write to it")
                rank_file = os.path.join(folder, f"local-rank-{local_rank}.prom")
            except OSError as exc:
                _warn(f"cannot use {folder} ({exc.strerror or exc}); set DAT_METRICS_DIR to a folder of this "
                      "user's; this pod's metrics are not exposed")
            if rank_file and local_rank == 0:
                # Files of an earlier attempt in this pod (restart, resume) would be served as stale
                # series. Other local ranks write their first file only after their first training step,
                # which they cannot finish before this rank has joined the training (its all-reduce).
                for name in os.listdir(folder):
                    if name.endswith(".prom"):
                        os.remove(os.path.join(folder, name))
                serving = CollectorRegistry()
                serving.register(_RankFilesCollector(folder))
                try:
                    server = serve_metrics(port, serving)
                except OSError as exc:
                    _warn(f"cannot serve metrics on port {port} ({exc.strerror or exc}); "
                          "this pod's metrics are not exposed")
        grouping = {"rank": str(rank)}
        if os.environ.get("DAT_NAMESPACE"):
            grouping["namespace"] = os.environ["DAT_NAMESPACE"]
        exporter = cls(registry=registry, job_name=job_name, labels=labels, rank_file=rank_file or "",
                       pushgateway=metrics_cfg.pushgateway, push_grouping=grouping, server=server,
                       grace_seconds=float(metrics_cfg.grace_seconds), job_wide=rank == 0, world_size=world_size)
        if exporter.job_wide:
            exporter._set_run_info(run_info)
            for record in history:
                exporter._set_job_wide(record)
            exporter._epoch.labels(**labels).set(epochs_done)  # a resumed run starts where it stopped
            exporter._epoch_progress.labels(**labels).set(0)
        now = time.time()
        exporter._last_epoch_time.labels(**labels).set(now)
        exporter._progress_time.labels(**labels).set(now)
        exporter._finished_gauge.labels(**labels).set(0)
        exporter._publish(write_file=local_rank == 0)
        return exporter

    def _define_metrics(self) -> None:
        r, base = self.registry, list(RANK_LABELS)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, base + list(extra), registry=r)

        # per rank: where this rank's time and bytes went, and whether it is alive
        self._epoch_seconds = gauge("dat_epoch_duration_seconds", "Wall time of this rank's last epoch, "
                                    "evaluation included.")
        self._train_seconds = gauge("dat_epoch_train_duration_seconds", "Wall time of this rank's last epoch "
                                    "without evaluation (the training steps).")
        self._step_seconds = gauge("dat_step_duration_seconds", "Mean wall time of a training step of this rank "
                                   "in the last epoch (of the steps this run trained: an epoch resumed mid-way "
                                   "counts its own); from the second epoch a process trains (the first pays for "
                                   "compilation and warm-up).")
        self._phase_seconds = gauge("dat_phase_duration_seconds", "Time per phase in the last epoch.",
                                    ("phase",))
        self._phase_total = Counter("dat_phase_seconds", "Time per phase, summed over epochs.",
                                    base + ["phase"], registry=r)
        self._bytes_total = Counter("dat_communication_bytes",
                                    "Gradient bytes this rank handed to all-reduce.", base, registry=r)
        self._dense_bytes_total = Counter(
            "dat_dense_communication_bytes",
            "Bytes the same steps would have sent with every parameter active (= sent when dense).",
            base, registry=r)
        self._calls_total = Counter("dat_communication_calls", "All-reduce calls.", base, registry=r)
        self._epoch_bytes = gauge("dat_epoch_communication_bytes", "Gradient bytes sent in the last epoch.")
        self._epoch_dense_bytes = gauge("dat_epoch_dense_communication_bytes",
                                        "Bytes a dense all-reduce would have sent in the last epoch.")
        self._images_total = Counter("dat_images", "Training images this rank has processed (sum over ranks: "
                                     "the job's).", base, registry=r)
        self._last_epoch_time = gauge("dat_last_epoch_timestamp_seconds",
                                      "Unix time of the last epoch end (of the start before the first).")
        self._progress_time = gauge("dat_progress_timestamp_seconds", "Unix time of this rank's last finished "
                                    f"training step or evaluation batch (updated at most every "
                                    f"{PROGRESS_SECONDS:g} s; the start before the first).")
        self._finished_gauge = gauge("dat_training_finished", "1 once training has ended, 0 while running.")
        self._outcome = gauge("dat_training_outcome", "1 for how training ended (completed, diverged: inf/NaN "
                              "loss or weights, stopped: SIGTERM or SIGINT, after a checkpoint, error: any other "
                              "failure); absent while running.", ("outcome",))
        self._end_time = gauge("dat_training_end_timestamp_seconds", "Unix time training ended; absent while "
                               "running (with a Pushgateway, what tells an old outcome from a new one).")
        if not self.job_wide:
            return
        # rank 0 only: the same on every rank (all-reduced, or the shared schedule and sampler)
        self._epoch = gauge("dat_epoch", "Last completed epoch (as numbered in metrics.jsonl).")
        self._epoch_progress = gauge("dat_epoch_progress_ratio", "Fraction of the training steps of the epoch "
                                     "in progress that are done (0 at an epoch end): dat_epoch + this = "
                                     "epochs done.")
        self._images_per_second = gauge("dat_images_per_second", "Training images of the whole job per "
                                        "second of the last epoch (evaluation excluded).")
        self._train_loss = gauge("dat_train_loss", "Mean training loss of the last epoch.")
        self._train_clean = gauge("dat_train_clean_accuracy", "Training accuracy on clean inputs (0-1).")
        self._train_adv = gauge("dat_train_robust_accuracy", "Training accuracy on adversarial inputs (0-1).")
        self._test_clean = gauge("dat_test_clean_accuracy", "Test accuracy on clean inputs at the last "
                                 "evaluation (0-1).")
        self._test_robust = gauge("dat_test_robust_accuracy", "Test accuracy under the evaluation attack "
                                  "at the last evaluation (0-1).")
        self._lr = gauge("dat_learning_rate", "Learning rate of the last epoch's first step.")
        self._active_layers = gauge("dat_jointspar_active_layers", "JointSpar arms (layers) active per "
                                    "step, mean over the last epoch (all arms when dense).")
        self._active_fraction = gauge("dat_jointspar_active_fraction", "Fraction of parameters "
                                      "synchronised per step, mean over the last epoch (1 when dense).")

    def _set_run_info(self, run_info: dict[str, str]) -> None:
        keys = sorted(run_info)
        for key in keys:
            if not _LABEL_NAME.match(key) or key in RANK_LABELS:
                raise ValueError(f"run_info key {key!r} is not usable as a Prometheus label")
        info = Gauge("dat_run_info", "Settings of the run, as labels (value 1).",
                     list(RANK_LABELS) + keys, registry=self.registry)
        info.labels(**self._labels, **{k: str(run_info[k]) for k in keys}).set(1)

    # ---- per epoch --------------------------------------------------------------------------
    def observe_epoch(self, record: dict) -> None:
        """Update this rank's metrics from its metrics.jsonl record; publish them."""
        if not self.enabled:
            return
        lab = self._labels

        def value(key: str) -> float | None:
            v = record.get(key)
            return None if v is None else float(v)

        seconds, eval_seconds, steps = value("epoch_seconds"), value("eval_seconds") or 0.0, value("steps")
        if seconds is not None:
            self._epoch_seconds.labels(**lab).set(seconds)
            self._train_seconds.labels(**lab).set(max(seconds - eval_seconds, 0.0))
            if steps and self._epochs_observed:  # the first epoch a process trains pays for torch.compile and
                # warm-up: after a resume within an epoch, over a few steps, it is no step time to compare
                self._step_seconds.labels(**lab).set(max(seconds - eval_seconds, 0.0) / steps)
        for key, phase in PHASE_LABELS.items():
            v = value(f"{key}_seconds")
            if v is not None:
                self._phase_seconds.labels(**lab, phase=phase).set(v)
                self._phase_total.labels(**lab, phase=phase).inc(max(v, 0.0))
        for counter, gauge, key in ((self._bytes_total, self._epoch_bytes, "comm_bytes"),
                                    (self._dense_bytes_total, self._epoch_dense_bytes, "dense_comm_bytes")):
            v = value(key)
            if v is not None:
                counter.labels(**lab).inc(v)
                gauge.labels(**lab).set(v)
        set_if_inc = ((self._calls_total, value("comm_calls")),
                      (self._images_total, None if value("images") is None else value("images") / self.world_size))
        for counter, v in set_if_inc:  # the record's images are the job's; every rank has an equal shard
            if v is not None:
                counter.labels(**lab).inc(v)
        if self.job_wide:
            self._set_job_wide(record)
        self._epochs_observed += 1
        now = time.time()
        self._last_epoch_time.labels(**lab).set(now)
        self._progress_time.labels(**lab).set(now)
        self._last_beat = self.clock()
        self._publish()

    def _set_job_wide(self, record: dict) -> None:
        """Rank 0's gauges from a record; a value the record lacks (no evaluation this epoch) stays as it was."""
        for gauge, key in ((self._epoch, "epoch"), (self._images_per_second, "images_per_second"),
                           (self._train_loss, "train_loss"), (self._train_clean, "train_clean_acc"),
                           (self._train_adv, "train_adv_acc"), (self._test_clean, "test_clean_acc"),
                           (self._test_robust, "test_robust_acc"), (self._lr, "lr"),
                           (self._active_layers, "jointspar_active_arms"),
                           (self._active_fraction, "jointspar_active_fraction")):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # (a hand-edited history line)
                gauge.labels(**self._labels).set(float(value))
        self._epoch_progress.labels(**self._labels).set(0.0)

    def progress(self, done: int | None = None, total: int | None = None) -> None:
        """The heartbeat: called after every training step (done of total) and evaluation batch; refreshes
        the progress metrics and the scrape file at most every PROGRESS_SECONDS, a Pushgateway at most every
        PUSH_PROGRESS_SECONDS. Costs a clock read otherwise, and never touches the device."""
        now = self.clock()
        if not self.enabled or now - self._last_beat < PROGRESS_SECONDS:
            return
        self._last_beat = now
        self._progress_time.labels(**self._labels).set(time.time())
        if self.job_wide and done is not None and total:
            self._epoch_progress.labels(**self._labels).set(done / total)
        push = now - self._last_push >= PUSH_PROGRESS_SECONDS
        if push:
            self._last_push = now
        self._publish(push=push)

    def _publish(self, write_file: bool = True, push: bool = True) -> None:
        if self.rank_file and write_file:
            try:
                write_to_textfile(self.rank_file, self.registry)
            except OSError as exc:
                _warn(f"cannot write {self.rank_file}: {exc}")
        if self.pushgateway and push:
            try:
                push_to_gateway(self.pushgateway, job=self.job_name, registry=self.registry,
                                grouping_key=self.push_grouping, timeout=5)
            except Exception as exc:  # an unreachable gateway must never stop training
                _warn(f"push to {self.pushgateway} failed: {exc}")

    # ---- end --------------------------------------------------------------------------------
    def finish(self, outcome: str = "completed", linger: bool = True) -> None:
        """Mark the run finished with its outcome (one of OUTCOMES), publish, keep the endpoint up for
        grace_seconds (so that Prometheus scrapes the last epoch and the outcome), then stop it. linger=False
        (a pod being deleted: its grace period belongs to the checkpoint) stops it at once."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r}: not one of {', '.join(OUTCOMES)}")
        if not self.enabled or self._finished:
            return
        self._finished = True
        self._finished_gauge.labels(**self._labels).set(1)
        self._outcome.labels(**self._labels, outcome=outcome).set(1)
        self._end_time.labels(**self._labels).set(time.time())
        self._publish()
        # After a failure every local rank waits: torchrun stops the whole pod as soon as one worker exits
        # non-zero, which would take the endpoint (and the outcome) down before Prometheus scraped it.
        # A stopped pod is on its way out (its grace period is short and the checkpoint comes first): no wait.
        wait = self.grace_seconds if (self.server is not None or (outcome != "completed" and self.rank_file)) else 0.0
        wait = 0.0 if outcome == "stopped" or not linger else wait
        if wait > 0 and outcome != "completed" and self.server is not None:
            _warn(f"training ended: {outcome}; serving the metrics {wait:g} s more (metrics.grace_seconds) so "
                  "that Prometheus scrapes the outcome")
        if wait > 0:
            time.sleep(wait)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
