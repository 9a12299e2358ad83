"""The alerting rules: the chart's PrometheusRule and the plain rules file agree, pass `promtool check rules`,
validate against the PrometheusRule CRD, and fire (and stay quiet) as intended under `promtool test rules`.

Set DAT_WRITE_RULES=1 to rewrite charts/dat-training/files/prometheus-rules.yaml from the chart."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from controller.schemas import crd_problems

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dat-training"
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
ALERTS = {"DATJobFailed", "DATJobRestartingRepeatedly", "DATJobWithoutMetrics", "DATExporterDown", "DATTrainingAborted", "DATTrainingStalled",
          "DATEpochSlow", "DATCommunicationDominant", "DATRobustAccuracyCollapse"}
HEADER = """\
# Prometheus alerting rules for DAT training runs (all jobs). Load with rule_files: in prometheus.yml.
# The Helm chart renders the same rules as a PrometheusRule (templates/prometheusrule.yaml, alerts.scope=all,
# exporter.enabled=true, default thresholds); tests/test_prometheus_rules.py fails when the two drift apart.
# Metrics: the trainer's per-pod exporter (trainer/observability.py) and `datctl exporter` (DATJobFailed,
# DATJobWithoutMetrics, DATExporterDown: drop DATExporterDown if you do not run the exporter).
"""


def tool(name: str, installer: str) -> str:
    path = shutil.which(name) or (str(ROOT / "bin" / name) if (ROOT / "bin" / name).exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make {installer}`")
    return path


def helm_template(*args: str, show_only: str = "templates/prometheusrule.yaml") -> subprocess.CompletedProcess:
    only = ["--show-only", show_only] if show_only else []
    return subprocess.run([tool("helm", "tools"), "template", "run-1", str(CHART), "--namespace", "team-a",
                           *only, *args], capture_output=True, text=True, timeout=120)


def render_rule(*sets: str, extra: tuple[str, ...] = ()) -> dict:
    args = [a for s in ("alerts.enabled=true", *sets) for a in ("--set", s)]
    proc = helm_template(*args, *extra)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s))


def test_plain_rules_file_is_the_chart_rendering_for_all_jobs():
    groups = render_rule("alerts.scope=all", "exporter.enabled=true")["spec"]["groups"]
    if os.environ.get("DAT_WRITE_RULES") == "1":
        RULES_FILE.write_text(HEADER + yaml.dump({"groups": groups}, Dumper=_Dumper, sort_keys=False, width=200))
    plain = yaml.safe_load(RULES_FILE.read_text())
    assert plain == {"groups": groups}, "files/prometheus-rules.yaml is stale: rerun this test with DAT_WRITE_RULES=1"
    assert {r["alert"] for g in groups for r in g["rules"]} == ALERTS


def promtool_check_rules(groups: list, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return subprocess.run([tool("promtool", "prometheus"), "check", "rules", str(path)], capture_output=True,
                          text=True)


def test_promtool_accepts_plain_and_release_scoped_rules(tmp_path):
    plain = subprocess.run([tool("promtool", "prometheus"), "check", "rules", str(RULES_FILE)],
                           capture_output=True, text=True)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in plain.stdout
    rule = render_rule("alerts.stalledAfterSeconds=600", "alerts.slowEpochWindow=3h", "alerts.ruleLabels.team=ml")
    checked = promtool_check_rules(rule["spec"]["groups"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    # scoped to this run's job, with the configured thresholds
    assert 'dat_progress_timestamp_seconds{namespace="team-a", job_name="run-1"}' in rules["DATTrainingStalled"]["expr"]
    assert "> 600" in rules["DATTrainingStalled"]["expr"]
    assert "[3h]" in rules["DATEpochSlow"]["expr"]
    assert 'job_namespace="team-a", job_name="run-1"' in rules["DATJobFailed"]["expr"]
    assert all(r["labels"]["team"] == "ml" for r in rules.values())


def test_a_broken_rule_fails_promtool(tmp_path):
    """The check above can fail: promtool rejects a rendering with a PromQL error."""
    groups = render_rule()["spec"]["groups"]
    groups[0]["rules"][1]["expr"] = groups[0]["rules"][1]["expr"].replace("max by", "max bye", 1)
    assert promtool_check_rules(groups, tmp_path).returncode != 0


def test_prometheusrule_matches_the_crd_schema():
    rule = render_rule("alerts.labels.release=kube-prometheus-stack", "alerts.ruleLabels.team=ml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["namespace"] == "team-a"
    assert crd_problems(rule) == []
    broken = yaml.safe_load(yaml.safe_dump(rule))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    assert any("for" in problem for problem in crd_problems(broken))


def rendered_kinds(*args: str) -> list[str]:
    proc = helm_template(*args, show_only="")
    assert proc.returncode == 0, proc.stderr
    return [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d]


def test_prometheusrule_follows_alerts_enabled():
    auto_without_api = rendered_kinds()  # auto, and the cluster does not serve monitoring.coreos.com/v1
    assert auto_without_api and "PrometheusRule" not in auto_without_api
    assert "PrometheusRule" in rendered_kinds("--api-versions", "monitoring.coreos.com/v1/PrometheusRule")
    assert "PrometheusRule" not in rendered_kinds("--set", "alerts.enabled=false",
                                                  "--api-versions", "monitoring.coreos.com/v1/PrometheusRule")


@pytest.mark.parametrize("setting", ["alerts.scope=everything", "alerts.slowEpochFactor=0.5",
                                     "alerts.communicationShare=2", "alerts.slowEpochWindow=1hour",
                                     "alerts.restartsInWindow=0", "alerts.restartWindow=hourly"])
def test_bad_alert_values_are_rejected_by_the_schema(setting):
    proc = helm_template("--set", "alerts.enabled=true", "--set", setting)
    assert proc.returncode != 0
    assert "alerts" in proc.stderr


UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # job states from datctl exporter: "bad" failed at 2m, "bad-v2" at 3m; "good" runs (no trainer metrics);
      # "training" runs and its trainer serves metrics; "finished" completed; "old" failed 2h before this
      # Prometheus (or exporter) started: nothing an hour back to compare with, yet no alert
      - series: 'dat_job_condition{{job_namespace="a", job_name="bad", kind="PyTorchJob", condition="Failed"}}'
        values: '0 0 1x70'
      - series: 'dat_job_completion_timestamp_seconds{{job_namespace="a", job_name="bad", kind="PyTorchJob"}}'
        values: '_ _ 120x70'
      - series: 'dat_job_completion_timestamp_seconds{{job_namespace="a", job_name="bad-v2", kind="TrainJob"}}'
        values: '_ _ _ 180x70'
      - series: 'dat_job_condition{{job_namespace="a", job_name="old", kind="PyTorchJob", condition="Failed"}}'
        values: '1x72'
      - series: 'dat_job_completion_timestamp_seconds{{job_namespace="a", job_name="old", kind="PyTorchJob"}}'
        values: '-7200x72'
      - series: 'dat_job_condition{{job_namespace="a", job_name="good", kind="TrainJob", condition="Failed"}}'
        values: '0x72'
      - series: 'dat_job_condition{{job_namespace="a", job_name="bad-v2", kind="TrainJob", condition="Failed"}}'
        values: '0 0 0 1x70'
      - series: 'dat_job_condition{{job_namespace="a", job_name="training", kind="PyTorchJob", condition="Running"}}'
        values: '1x72'
      - series: 'dat_progress_timestamp_seconds{{namespace="a", job_name="training", rank="0"}}'
        values: '0+60x72'
      - series: 'dat_job_condition{{job_namespace="a", job_name="finished", kind="TrainJob", condition="Complete"}}'
        values: '1x72'
      # restarts the exporter saw: "flappy" restarted at 10, 20 and 30 min (a restart loop), "once" at 10 min
      - series: 'dat_job_restarts_total{{job_namespace="a", job_name="flappy", kind="PyTorchJob"}}'
        values: '0x9 1x10 2x10 3x70'
      - series: 'dat_job_restarts_total{{job_namespace="a", job_name="once", kind="PyTorchJob"}}'
        values: '0x9 1x90'
      # the exporter itself: up for 20 minutes, then gone
      - series: 'dat_exporter_jobs{{namespace="dat-system", kind="PyTorchJob"}}'
        values: '4x20 stale'
      # outcomes: "nan" diverged at 5m, "ok" completed, "spot" stopped by SIGTERM (a preempted node: it resumes);
      # through a Pushgateway, which keeps the last push for good: "pushed" errored at 5m, "long-ago" 2h earlier
      - series: 'dat_training_outcome{{namespace="d", job_name="nan", rank="0", outcome="diverged"}}'
        values: '_x5 1x2 stale'
      - series: 'dat_training_end_timestamp_seconds{{namespace="d", job_name="nan", rank="0"}}'
        values: '_x5 300x2 stale'
      - series: 'dat_training_outcome{{namespace="d", job_name="pushed", rank="0", outcome="error"}}'
        values: '_x5 1x80'
      - series: 'dat_training_end_timestamp_seconds{{namespace="d", job_name="pushed", rank="0"}}'
        values: '_x5 300x80'
      - series: 'dat_training_outcome{{namespace="d", job_name="long-ago", rank="0", outcome="error"}}'
        values: '1x80'
      - series: 'dat_training_end_timestamp_seconds{{namespace="d", job_name="long-ago", rank="0"}}'
        values: '-7200x80'
      - series: 'dat_training_outcome{{namespace="d", job_name="spot", rank="0", outcome="stopped"}}'
        values: '_x5 1x2 stale'
      - series: 'dat_training_outcome{{namespace="d", job_name="ok", rank="0", outcome="completed"}}'
        values: '_x5 1x2 stale'
      # stalled: last step at t=120s, still running; "done" finished; "busy" made progress until 40m
      - series: 'dat_progress_timestamp_seconds{{namespace="a", job_name="stuck", rank="0"}}'
        values: '0 60 120x50'
      - series: 'dat_training_finished{{namespace="a", job_name="stuck", rank="0"}}'
        values: '0x52'
      - series: 'dat_progress_timestamp_seconds{{namespace="a", job_name="done", rank="0"}}'
        values: '0 60 120x50'
      - series: 'dat_training_finished{{namespace="a", job_name="done", rank="0"}}'
        values: '0 0 1x50'
      - series: 'dat_progress_timestamp_seconds{{namespace="a", job_name="busy", rank="0"}}'
        values: '0+60x52'
      - series: 'dat_training_finished{{namespace="a", job_name="busy", rank="0"}}'
        values: '0x52'
      # mean training step: 1 s for 40 min, then 2 s ("slow", 2x) or 1.4 s ("fine", 1.4x); "evals" evaluates
      # every few epochs (epoch 100 s or 400 s with evaluation); "resumed" restarts mid-epoch at 40m: a 20 s epoch
      # of the remaining 20 steps, then a full one, 100 s, at the same speed per step
      - series: 'dat_step_duration_seconds{{namespace="a", job_name="slow", rank="1"}}'
        values: '1x40 2x5'
      - series: 'dat_step_duration_seconds{{namespace="a", job_name="fine", rank="1"}}'
        values: '1x40 1.4x5'
      - series: 'dat_step_duration_seconds{{namespace="a", job_name="evals", rank="0"}}'
        values: '1x45'
      - series: 'dat_epoch_duration_seconds{{namespace="a", job_name="evals", rank="0"}}'
        values: '100x40 400x5'
      - series: 'dat_step_duration_seconds{{namespace="a", job_name="resumed", rank="0"}}'
        values: '1x45'
      - series: 'dat_epoch_train_duration_seconds{{namespace="a", job_name="resumed", rank="0"}}'
        values: '100x40 20x2 100x3'
      # communication: 60 % of 100 s of training for "chatty"; 40 % for "quiet" (whose 300 s epochs are
      # mostly evaluation)
      - series: 'dat_phase_duration_seconds{{namespace="b", job_name="chatty", rank="0", phase="communication"}}'
        values: '60x30'
      - series: 'dat_epoch_train_duration_seconds{{namespace="b", job_name="chatty", rank="0"}}'
        values: '100x30'
      - series: 'dat_phase_duration_seconds{{namespace="b", job_name="quiet", rank="0", phase="communication"}}'
        values: '40x30'
      - series: 'dat_epoch_train_duration_seconds{{namespace="b", job_name="quiet", rank="0"}}'
        values: '100x30'
      - series: 'dat_epoch_duration_seconds{{namespace="b", job_name="quiet", rank="0"}}'
        values: '300x30'
      # robust accuracy: 0.45 -> 0.20 (25 points, collapse) and 0.45 -> 0.30 (15 points); "restart" collapses
      # to 0.10 in a new pod (another instance) after its first pod went away at 10m
      - series: 'dat_test_robust_accuracy{{namespace="c", job_name="fgsm", rank="0"}}'
        values: '0.40x5 0.45x5 0.20x5'
      - series: 'dat_test_robust_accuracy{{namespace="c", job_name="pgd", rank="0"}}'
        values: '0.40x5 0.45x5 0.30x5'
      - series: 'dat_test_robust_accuracy{{namespace="c", job_name="restart", rank="0", instance="pod-a"}}'
        values: '0.40x5 0.45x4 stale'
      - series: 'dat_test_robust_accuracy{{namespace="c", job_name="restart", rank="0", instance="pod-b"}}'
        values: '_x10 0.10x5'
      # "again": a run reached 0.52, then a new run of the same job name (another run_id) starts at 0.15
      - series: 'dat_test_robust_accuracy{{namespace="c", job_name="again", run_id="r1", rank="0", instance="pod-a"}}'
        values: '0.50x5 0.52x4 stale'
      - series: 'dat_test_robust_accuracy{{namespace="c", job_name="again", run_id="r2", rank="0", instance="pod-c"}}'
        values: '_x10 0.15x5'
      # "rerun": 3 s steps for 40 min, then a new run of the same name: 1 s steps, then an epoch of 2 s steps
      # (slow for this run, though fast next to the earlier run's median)
      - series: 'dat_step_duration_seconds{{namespace="a", job_name="rerun", run_id="r1", rank="0"}}'
        values: '3x40 stale'
      - series: 'dat_step_duration_seconds{{namespace="a", job_name="rerun", run_id="r2", rank="0"}}'
        values: '_x41 1x5 2'
    alert_rule_test:
      - {{eval_time: 1m, alertname: DATJobFailed, exp_alerts: []}}
      - eval_time: 3m
        alertname: DATJobFailed
        exp_alerts:
          - exp_labels: {{severity: critical, job_namespace: a, job_name: bad, kind: PyTorchJob}}
            exp_annotations:
              summary: PyTorchJob a/bad failed
              description: The training operator marked the job Failed (reported by datctl exporter). See kubectl describe pytorchjob -n a bad.
          - exp_labels: {{severity: critical, job_namespace: a, job_name: bad-v2, kind: TrainJob}}
            exp_annotations:
              summary: TrainJob a/bad-v2 failed
              description: The training operator marked the job Failed (reported by datctl exporter). See kubectl describe trainjob -n a bad-v2.
      - {{eval_time: 70m, alertname: DATJobFailed, exp_alerts: []}}  # an hour after the failure: quiet
      - {{eval_time: 25m, alertname: DATJobRestartingRepeatedly, exp_alerts: []}}
      - eval_time: 35m
        alertname: DATJobRestartingRepeatedly
        exp_alerts:
          - exp_labels: {{severity: warning, job_namespace: a, job_name: flappy, kind: PyTorchJob}}
            exp_annotations:
              summary: PyTorchJob a/flappy restarted 3 times
              description: 'The training operator restarted the job at least 3 times in 1h (each restart resumes from the last checkpoint, but a loop makes no progress). datctl status shows how each pod last exited: 200 lost a peer, 201 rendezvous failed, 137 killed (OOM), 143 stopped by SIGTERM. Under restartPolicy ExitCode such restarts have no limit.'
      - {{eval_time: 95m, alertname: DATJobRestartingRepeatedly, exp_alerts: []}}  # no restart in the last hour
      - {{eval_time: 10m, alertname: DATJobWithoutMetrics, exp_alerts: []}}
      - eval_time: 20m
        alertname: DATJobWithoutMetrics
        exp_alerts:
          - exp_labels: {{severity: warning, job_namespace: a, job_name: good, kind: TrainJob}}
            exp_annotations:
              summary: TrainJob a/good has not ended but serves no trainer metrics
              description: 'The job exists and has not succeeded, failed or been suspended, yet no trainer metrics arrived for 15m: pods pending (no GPU nodes, image pull), crash-looping before training, or not scraped (metrics.port 0, PodMonitor not selected by Prometheus).'
      - {{eval_time: 15m, alertname: DATExporterDown, exp_alerts: []}}
      - eval_time: 45m
        alertname: DATExporterDown
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: datctl exporter serves no metrics
              description: 'No datctl exporter metrics for 10m: DATJobFailed, DATJobRestartingRepeatedly and DATJobWithoutMetrics cannot fire. Check the exporter Deployment and its PodMonitor.'
      - {{eval_time: 4m, alertname: DATTrainingAborted, exp_alerts: []}}
      - eval_time: 50m
        alertname: DATTrainingAborted
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: d, job_name: nan, outcome: diverged}}
            exp_annotations:
              summary: 'Training of d/nan ended: diverged'
              description: 'The trainer stopped before its last epoch (diverged: the loss or the weights became inf or NaN, the last good checkpoint is kept; error: see the pod log). The job fails too; a restart resumes from the last checkpoint.'
          - exp_labels: {{severity: warning, namespace: d, job_name: pushed, outcome: error}}
            exp_annotations:
              summary: 'Training of d/pushed ended: error'
              description: 'The trainer stopped before its last epoch (diverged: the loss or the weights became inf or NaN, the last good checkpoint is kept; error: see the pod log). The job fails too; a restart resumes from the last checkpoint.'
      - {{eval_time: 70m, alertname: DATTrainingAborted, exp_alerts: []}}
      - {{eval_time: 25m, alertname: DATTrainingStalled, exp_alerts: []}}
      - eval_time: 40m
        alertname: DATTrainingStalled
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: a, job_name: stuck}}
            exp_annotations:
              summary: No training progress in a/stuck for 38m 0s
              description: No training step or evaluation batch finished for more than 1800 seconds while the trainer still serves metrics (hung collective, deadlock or dead data loader).
      - {{eval_time: 30m, alertname: DATEpochSlow, exp_alerts: []}}
      - eval_time: 42m
        alertname: DATEpochSlow
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: a, job_name: slow}}
            exp_annotations:
              summary: Training steps of the last epoch of a/slow took 2s each
              description: The last epoch's mean training step took more than 1.5 times its median over the last 1h (slow node, throttling, network).
      - eval_time: 47m
        alertname: DATEpochSlow
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: a, job_name: slow}}
            exp_annotations:
              summary: Training steps of the last epoch of a/slow took 2s each
              description: The last epoch's mean training step took more than 1.5 times its median over the last 1h (slow node, throttling, network).
          - exp_labels: {{severity: warning, namespace: a, job_name: rerun, run_id: r2}}
            exp_annotations:
              summary: Training steps of the last epoch of a/rerun took 2s each
              description: The last epoch's mean training step took more than 1.5 times its median over the last 1h (slow node, throttling, network).
      - {{eval_time: 5m, alertname: DATCommunicationDominant, exp_alerts: []}}
      - eval_time: 15m
        alertname: DATCommunicationDominant
        exp_alerts:
          - exp_labels: {{severity: info, namespace: b, job_name: chatty}}
            exp_annotations:
              summary: Communication takes 60% of the training time of b/chatty
              description: 'Gradient all-reduce is more than 0.5 of the epoch''s training time on some rank: consider JointSpar, larger batches or fewer nodes.'
      - {{eval_time: 8m, alertname: DATRobustAccuracyCollapse, exp_alerts: []}}
      - eval_time: 12m
        alertname: DATRobustAccuracyCollapse
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: c, job_name: fgsm}}
            exp_annotations:
              summary: Robust accuracy of c/fgsm fell 25% below its recent best
              description: 'Robust test accuracy dropped by more than 0.2 (fraction) from the best of this run in the last 6h (across restarts and resumes, not across runs of the same name): catastrophic overfitting (common with FGSM training); lower the step size or use PGD.'
          - exp_labels: {{severity: warning, namespace: c, job_name: restart}}
            exp_annotations:
              summary: Robust accuracy of c/restart fell 35% below its recent best
              description: 'Robust test accuracy dropped by more than 0.2 (fraction) from the best of this run in the last 6h (across restarts and resumes, not across runs of the same name): catastrophic overfitting (common with FGSM training); lower the step size or use PGD.'
"""


def test_alerts_fire_and_stay_quiet_as_intended(tmp_path):
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(UNIT_TESTS.format(rules=RULES_FILE))
    proc = subprocess.run([tool("promtool", "prometheus"), "test", "rules", str(tests)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
