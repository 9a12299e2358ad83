"""The trainer's Prometheus exporter, driven directly: two ranks of one pod sharing one port,
grace period, stale files, a busy port, and a real Pushgateway."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port

from trainer.config import MetricsConfig
from trainer import observability
from trainer.observability import TrainingExporter, resolve_job_name

ROOT = Path(__file__).resolve().parents[1]
RUN_INFO = {"model": "small_cnn", "attack": "pgd", "optimizer": "lamb", "loss": "dat", "jointspar": "on",
            "world_size": "2"}


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def find(text: str, name: str, **labels: str) -> list[float]:
    return [s.value for s in samples(text)
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def record(epoch: int, rank: int) -> dict:
    """A metrics.jsonl record with values that differ per epoch and rank."""
    phases = {"data_seconds": 0.1, "attack_seconds": 1.0 + rank, "compute_seconds": 0.5,
              "comm_seconds": 0.25 * epoch, "optimizer_seconds": 0.05, "eval_seconds": 0.3}
    return {"epoch": epoch, "epoch_seconds": sum(phases.values()), **phases,
            "steps": 4 if epoch == 2 else 8,  # epoch 2 resumed at step 4 of 8
            "comm_bytes": 1000 * epoch + rank, "dense_comm_bytes": 4000 * epoch, "comm_calls": 7,
            "images": 128, "images_per_second": 50.0 + rank, "train_loss": 2.0 / epoch,
            "train_clean_acc": 0.3, "train_adv_acc": 0.2,
            "test_clean_acc": 0.5 if epoch == 1 else None, "test_robust_acc": 0.25 if epoch == 1 else None,
            "lr": 0.01 * epoch, "jointspar_active_arms": 3.5, "jointspar_active_fraction": 0.4,
            "jointspar_p_min": 0.1, "jointspar_p_max": 0.9, "jointspar_p_entropy": 1.2}


WORKER = r"""
import json, sys, time
from pathlib import Path
from trainer.config import MetricsConfig
from trainer.observability import TrainingExporter
port, local_rank, grace, records, done = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
ex = TrainingExporter.start(MetricsConfig(port=port, grace_seconds=grace, job_name="pod-test"), rank=local_rank,
                            local_rank=local_rank, node_rank=0, world_size=2, local_world_size=2,
                            run_info=json.loads(sys.argv[6]), default_job_name="unused")
Path(done + ".started").touch()
while not Path(records).exists():
    time.sleep(0.05)
for rec in json.loads(Path(records).read_text())[str(local_rank)]:
    ex.observe_epoch(rec)
Path(done).touch()
ex.finish()
"""


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_ranks_of_one_pod_share_one_port_then_grace_then_stop(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DAT_METRICS_DIR=str(tmp_path / "exchange"))
    # a stale file of an earlier attempt in this pod must not be served
    (tmp_path / "exchange").mkdir()
    (tmp_path / "exchange" / "local-rank-5.prom").write_text('dat_epoch{rank="5"} 99\n')
    grace = 8.0  # rank 0 serves this long after its last epoch: room for the scrape below on a loaded machine
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(r), str(grace),
                               str(tmp_path / "records.json"), str(tmp_path / f"done{r}"), json.dumps(RUN_INFO)],
                              env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        wait_for(lambda: all((tmp_path / f"done{r}.started").exists() for r in (0, 1)), what="exporters")
        before = scrape(port)  # local rank 0 has published its start-up state only
        assert find(before, "dat_training_finished", rank="0") == [0.0]
        assert find(before, "dat_epoch", rank="0") == [0.0]
        assert find(before, "dat_training_outcome", rank="0") == []
        assert find(before, "dat_progress_timestamp_seconds", rank="1") == []  # rank 1 has published nothing yet
        assert find(before, "dat_epoch", rank="5") == []
        records = {str(r): [record(1, r), record(2, r)] for r in (0, 1)}
        (tmp_path / "records.json").write_text(json.dumps(records))
        wait_for(lambda: all((tmp_path / f"done{r}").exists() for r in (0, 1)), what="epochs")
        procs[1].wait(timeout=30)
        assert procs[1].returncode == 0, procs[1].stderr.read()
        text = scrape(port)  # rank 1 has exited; rank 0 still serves within the grace period
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert procs[0].returncode == 0, procs[0].stderr.read()
    with pytest.raises(urllib.error.URLError):
        scrape(port, timeout=2)

    for rank in (0, 1):
        base = {"job_name": "pod-test", "rank": str(rank), "local_rank": str(rank), "node_rank": "0"}
        last = records[str(rank)][1]
        # per rank: timings, bytes, images, heartbeat, end
        assert find(text, "dat_epoch_duration_seconds", **base) == [pytest.approx(last["epoch_seconds"])]
        assert find(text, "dat_epoch_train_duration_seconds", **base) == [
            pytest.approx(last["epoch_seconds"] - last["eval_seconds"])]
        # from the process's second epoch (its first pays for compilation): epoch 2, resumed at step 4 of 8
        assert find(text, "dat_step_duration_seconds", **base) == [
            pytest.approx((last["epoch_seconds"] - last["eval_seconds"]) / 4)]
        assert find(text, "dat_phase_duration_seconds", **base, phase="communication") == [0.5]
        assert find(text, "dat_phase_seconds_total", **base, phase="communication") == [pytest.approx(0.75)]
        assert find(text, "dat_phase_seconds_total", **base, phase="attack") == [pytest.approx(2.0 + 2 * rank)]
        assert find(text, "dat_communication_bytes_total", **base) == [3000 + 2 * rank]
        assert find(text, "dat_dense_communication_bytes_total", **base) == [12000]
        assert find(text, "dat_epoch_communication_bytes", **base) == [2000 + rank]
        assert find(text, "dat_images_total", **base) == [128.0]  # 2 epochs x 128 images of the job / 2 ranks
        assert find(text, "dat_progress_timestamp_seconds", **base)[0] > time.time() - 120
        assert find(text, "dat_training_finished", **base) == [1.0]
        assert find(text, "dat_training_outcome", **base, outcome="completed") == [1.0]
        assert time.time() - 120 < find(text, "dat_training_end_timestamp_seconds", **base)[0] <= time.time()
        # the job's values: rank 0 only
        job_wide = {"dat_epoch": 2.0, "dat_epoch_progress_ratio": 0.0, "dat_images_per_second": 50.0,
                    "dat_train_loss": 1.0, "dat_learning_rate": 0.02,
                    "dat_test_clean_accuracy": 0.5, "dat_test_robust_accuracy": 0.25,  # epoch 1's evaluation stays
                    "dat_jointspar_active_layers": 3.5, "dat_jointspar_active_fraction": 0.4}
        for name, value in job_wide.items():
            assert find(text, name, **base) == ([value] if rank == 0 else []), (name, rank)
        assert find(text, "dat_run_info", **base, **RUN_INFO) == ([1.0] if rank == 0 else [])
    assert not any(s.name.endswith("_created") for s in samples(text))
    assert find(text, "dat_epoch", rank="5") == []

    assert shutil.which("promtool"), "promtool is missing: run `make prometheus` (Debian package prometheus)"
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_disabled_exporter_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    ex = TrainingExporter.start(MetricsConfig(port=0), rank=0, local_rank=0, node_rank=0, world_size=1,
                                local_world_size=1, run_info=RUN_INFO, default_job_name="x")
    assert not ex.enabled and ex.server is None
    ex.observe_epoch(record(1, 0))
    ex.finish()
    assert list(tmp_path.iterdir()) == []


def test_busy_port_warns_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        ex = TrainingExporter.start(MetricsConfig(port=port), rank=0, local_rank=0, node_rank=0, world_size=1,
                                    local_world_size=1, run_info=RUN_INFO, default_job_name="busy")
        ex.observe_epoch(record(1, 0))
        ex.finish()
    assert f"cannot serve metrics on port {port}" in capsys.readouterr().err
    assert ex.server is None
    assert 'dat_epoch{job_name="busy"' in (tmp_path / "local-rank-0.prom").read_text()


def test_job_name_resolution_order():
    host = "ignored-host"
    assert resolve_job_name("cfg", "default", env={"DAT_JOB_NAME": "env"}, hostname="a-master-0") == "cfg"
    assert resolve_job_name("", "default", env={"DAT_JOB_NAME": "env"}, hostname="a-master-0") == "env"
    assert resolve_job_name("", "default", env={}, hostname="my-job-master-0") == "my-job"
    assert resolve_job_name("", "default", env={}, hostname="dat-2-worker-11") == "dat-2"
    assert resolve_job_name("", "default", env={}, hostname=host) == "default"
    assert resolve_job_name("", "default", env={}, hostname="laptop-worker-x") == "default"


def test_bad_run_info_key_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="run_info key 'world size'"):
        TrainingExporter.start(MetricsConfig(pushgateway="127.0.0.1:1"), rank=0, local_rank=0, node_rank=0,
                               world_size=1, local_world_size=1, run_info={"world size": "1"},
                               default_job_name="x")


@pytest.fixture
def pushgateway(tmp_path):
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.fail("prometheus-pushgateway is not installed: run `make prometheus` (Debian package "
                    "prometheus-pushgateway)")
    port = free_port()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def ready() -> bool:
        try:
            scrape(port, timeout=1)
            return True
        except OSError:
            return False

    try:
        wait_for(ready, timeout=20, what="pushgateway")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_push_to_a_real_pushgateway_at_every_epoch_end(pushgateway, monkeypatch):
    monkeypatch.setenv("DAT_NAMESPACE", "team-a")
    exporters = [TrainingExporter.start(MetricsConfig(pushgateway=f"127.0.0.1:{pushgateway}", job_name="pushed"),
                                        rank=r, local_rank=0, node_rank=r, world_size=2, local_world_size=1,
                                        run_info=RUN_INFO, default_job_name="x") for r in (0, 1)]
    for r, ex in enumerate(exporters):
        assert ex.server is None  # no port: push only
        ex.observe_epoch(record(1, r))
    text = scrape(pushgateway)
    for r in (0, 1):
        # the grouping key (job, namespace, rank) keeps the ranks apart on the gateway
        assert find(text, "dat_communication_bytes_total", job="pushed", namespace="team-a", rank=str(r),
                    node_rank=str(r)) == [1000.0 + r]
    exporters[0].observe_epoch(record(2, 0))
    text = scrape(pushgateway)
    assert find(text, "dat_epoch", job="pushed", rank="0") == [2.0]
    assert find(text, "dat_communication_bytes_total", job="pushed", rank="0") == [3000.0]
    assert find(text, "dat_communication_bytes_total", job="pushed", rank="1") == [1001.0]
    exporters[0].finish()
    text = scrape(pushgateway)
    assert find(text, "dat_training_finished", job="pushed", rank="0") == [1.0]
    # what tells DATTrainingAborted an outcome the gateway has kept for hours from a new one
    assert time.time() - 120 < find(text, "dat_training_end_timestamp_seconds", job="pushed", rank="0")[0]


def test_unreachable_pushgateway_only_warns(capsys):
    ex = TrainingExporter.start(MetricsConfig(pushgateway=f"127.0.0.1:{free_port()}"), rank=0, local_rank=0,
                                node_rank=0, world_size=1, local_world_size=1, run_info=RUN_INFO,
                                default_job_name="x")
    ex.observe_epoch(record(1, 0))
    assert "push to 127.0.0.1:" in capsys.readouterr().err


def test_unusable_metrics_dir_warns_and_training_goes_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path / "a-file" / "metrics"))
    ex = TrainingExporter.start(MetricsConfig(port=free_port()), rank=0, local_rank=0, node_rank=0, world_size=1,
                                local_world_size=1, run_info=RUN_INFO, default_job_name="x")
    ex.observe_epoch(record(1, 0))
    ex.finish()
    assert "set DAT_METRICS_DIR to a folder of this user's" in capsys.readouterr().err
    assert ex.server is None and ex.rank_file == ""


def test_a_metrics_folder_others_may_write_to_is_not_served(tmp_path, monkeypatch, capsys):
    """Without DAT_METRICS_DIR the folder has a fixed name in /tmp: on a shared machine another user could make
    it first and plant .prom files (a spoofed outcome="completed"). One that is not this user's alone is
    refused; the endpoint stays off, training goes on."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "local-rank-7.prom").write_text('dat_training_outcome{outcome="completed"} 1\n')
    monkeypatch.setenv("DAT_METRICS_DIR", str(shared))
    ex = TrainingExporter.start(MetricsConfig(port=free_port()), rank=0, local_rank=0, node_rank=0, world_size=1,
                                local_world_size=1, run_info=RUN_INFO, default_job_name="x")
    ex.finish(linger=False)
    assert "others may write to it" in capsys.readouterr().err
    assert ex.server is None and ex.rank_file == ""
    shared.chmod(0o700)  # this user's alone: used
    ex = TrainingExporter.start(MetricsConfig(port=free_port()), rank=0, local_rank=0, node_rank=0, world_size=1,
                                local_world_size=1, run_info=RUN_INFO, default_job_name="x")
    try:
        assert ex.rank_file and not (shared / "local-rank-7.prom").exists()  # stale files of the pod removed
    finally:
        ex.finish(linger=False)


def test_progress_heartbeat_is_throttled_and_pushed_less_often(tmp_path, monkeypatch, capsys):
    """During an epoch the pod's file gets the heartbeat at most every PROGRESS_SECONDS (the stall alert reads
    it); a Pushgateway at most every PUSH_PROGRESS_SECONDS (hundreds of ranks push to one)."""
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    now = [1000.0]
    monkeypatch.setattr(TrainingExporter, "clock", staticmethod(lambda: now[0]))
    pushes = []
    monkeypatch.setattr(observability, "push_to_gateway", lambda *args, **kwargs: pushes.append(now[0]))
    ex = TrainingExporter.start(MetricsConfig(port=free_port(), pushgateway="127.0.0.1:9091"), rank=0,
                                local_rank=0, node_rank=0, world_size=1, local_world_size=1, run_info=RUN_INFO,
                                default_job_name="beat", epochs_done=3)
    file = tmp_path / "local-rank-0.prom"
    assert find(file.read_text(), "dat_epoch") == [3.0]  # resumed after epoch 3
    pushes.clear()
    now[0] += observability.PROGRESS_SECONDS - 1
    ex.progress(4, 10)  # within PROGRESS_SECONDS of the start: nothing written
    assert find(file.read_text(), "dat_epoch_progress_ratio") == [0.0] and pushes == []
    now[0] += 1
    ex.progress(4, 10)
    assert find(file.read_text(), "dat_epoch_progress_ratio") == [0.4] and pushes == []  # the file, not the gateway
    for _ in range(int(observability.PUSH_PROGRESS_SECONDS // observability.PROGRESS_SECONDS)):
        now[0] += observability.PROGRESS_SECONDS
        ex.progress(5, 10)
    assert pushes == [1000.0 + observability.PUSH_PROGRESS_SECONDS]  # one push a minute
    ex.finish()


@pytest.mark.parametrize("outcome, waits", [("completed", False), ("diverged", True), ("error", True),
                                             ("stopped", False)])
def test_after_a_failure_every_local_rank_waits_out_the_grace(tmp_path, monkeypatch, outcome, waits):
    """torchrun stops a pod's workers as soon as one exits non-zero: a rank other than the serving one that
    left at once would take the outcome down with local rank 0 before Prometheus scraped it. A stopped run
    (SIGTERM) does not wait: its pod is being deleted, and the grace period belongs to the checkpoint."""
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    ex = TrainingExporter.start(MetricsConfig(port=free_port(), grace_seconds=0.5), rank=1, local_rank=1,
                                node_rank=0, world_size=2, local_world_size=2, run_info=RUN_INFO,
                                default_job_name="j")
    assert ex.server is None  # local rank 1 does not serve
    slept = []
    monkeypatch.setattr(observability.time, "sleep", slept.append)
    ex.finish(outcome)
    assert slept == ([0.5] if waits else [])
    assert find((tmp_path / "local-rank-1.prom").read_text(), "dat_training_outcome", outcome=outcome) == [1.0]


def test_an_unknown_outcome_is_a_bug_not_a_new_label(tmp_path, monkeypatch):
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    ex = TrainingExporter.start(MetricsConfig(port=0), rank=0, local_rank=0, node_rank=0, world_size=1,
                                local_world_size=1, run_info=RUN_INFO, default_job_name="x")
    with pytest.raises(ValueError, match="not one of completed, diverged, error"):
        ex.finish("crashed")


def test_phase_labels_cover_every_timed_phase():
    from trainer.metrics import PHASES
    assert list(observability.PHASE_LABELS) == list(PHASES)


def test_datctl_and_its_exporter_start_without_torch():
    """datctl starts in a fraction of a second, and the exporter fits its 256 Mi pod: neither imports torch
    (`datctl render`/`submit` load it later, for the checks that build the model on the meta device)."""
    code = "import sys, controller.cli, controller.exporter; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_a_run_that_got_sigterm_does_not_linger(tmp_path, monkeypatch):
    """A SIGTERM late in the last epoch lets the run complete, but its pod is being deleted: the endpoint
    closes at once instead of serving grace_seconds more into the kill."""
    ex = TrainingExporter.start(MetricsConfig(port=free_port(), grace_seconds=5.0), rank=0, local_rank=0,
                                node_rank=0, world_size=1, local_world_size=1, run_info=RUN_INFO, default_job_name="j")
    assert ex.server is not None
    slept = []
    monkeypatch.setattr(observability.time, "sleep", slept.append)
    ex.finish("completed", linger=False)
    assert slept == [] and ex.server is None


def test_a_hand_edited_history_value_is_skipped_not_a_crash_loop(tmp_path, monkeypatch):
    """A metrics.jsonl record whose value is no number (edited by hand) must not stop every restart."""
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    port = free_port()
    edited = {**record(1, 0), "test_robust_acc": "n/a", "train_loss": [1], "lr": True}
    ex = TrainingExporter.start(MetricsConfig(port=port, job_name="edited"), rank=0, local_rank=0, node_rank=0,
                                world_size=1, local_world_size=1, run_info=RUN_INFO, default_job_name="x",
                                epochs_done=2, history=[edited, {**record(2, 0), "train_loss": "x"}])
    try:
        text = scrape(port)
        assert find(text, "dat_test_robust_accuracy") == [] and find(text, "dat_train_loss") == []
        assert find(text, "dat_test_clean_accuracy") == [0.5] and find(text, "dat_learning_rate") == [0.02]
    finally:
        ex.finish(linger=False)


def test_a_resumed_run_serves_its_last_evaluation_from_the_start(tmp_path, monkeypatch):
    """The job-wide gauges of a resumed run come from its metrics.jsonl records before its first new epoch: the
    accuracy of the last evaluation (epoch 1 here; epoch 2 was not evaluated), the loss and LR of epoch 2."""
    monkeypatch.setenv("DAT_METRICS_DIR", str(tmp_path))
    port = free_port()
    ex = TrainingExporter.start(MetricsConfig(port=port, job_name="resumed"), rank=0, local_rank=0, node_rank=0,
                                world_size=1, local_world_size=1, run_info=RUN_INFO, default_job_name="x",
                                epochs_done=2, history=[record(1, 0), record(2, 0)])
    try:
        text = scrape(port)
        assert find(text, "dat_epoch") == [2.0]
        assert find(text, "dat_test_robust_accuracy") == [0.25] and find(text, "dat_test_clean_accuracy") == [0.5]
        assert find(text, "dat_train_loss") == [1.0] and find(text, "dat_learning_rate") == [0.02]
        assert find(text, "dat_epoch_progress_ratio") == [0.0]
        assert find(text, "dat_training_end_timestamp_seconds") == []  # running
        ex.observe_epoch(record(3, 0))  # the first epoch this process trains: compilation, warm-up
        assert find(scrape(port), "dat_step_duration_seconds") == []
        ex.observe_epoch(record(4, 0))
        fourth = record(4, 0)
        assert find(scrape(port), "dat_step_duration_seconds") == [
            pytest.approx((fourth["epoch_seconds"] - fourth["eval_seconds"]) / fourth["steps"])]
    finally:
        ex.finish(linger=False)
