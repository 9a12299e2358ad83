"""datctl's command line: the exporter subcommand is delegated to controller.exporter (imported only when
used), and a missing module or a bad subcommand is a one-line error with exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller import cli

ROOT = Path(__file__).resolve().parents[1]


def test_exporter_arguments_come_from_the_exporter_module(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["exporter", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: datctl exporter") and "--port" in out and "--namespace" in out


def test_exporter_runs_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    from controller import exporter
    seen = {}
    monkeypatch.setattr(exporter, "run", lambda args: seen.setdefault("args", args) and 7)
    assert cli.main(["exporter", "--port", "9555", "--namespace", "team-a"]) == 7
    assert (seen["args"].port, seen["args"].namespace) == (9555, "team-a")


def test_missing_exporter_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "controller.exporter", None)  # makes the import fail
    assert cli.main(["exporter", "--port", "9555"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("datctl: the exporter is not available in this installation") and err.count("\n") == 1
    # every other command still works
    assert cli.main(["render", str(ROOT / "manifests" / "specs" / "dat-smoke.yaml")]) == 0


def test_usage_errors_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "launch"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "invalid choice: 'launch'" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_a_job_spec_says_where_it_goes(capsys: pytest.CaptureFixture) -> None:
    """A job spec is no manifest: exit 2 with a hint, not "ok: 0 PyTorchJob(s)"."""
    spec = str(ROOT / "manifests" / "specs" / "dat-smoke.yaml")
    assert cli.main(["validate", spec]) == 2
    assert capsys.readouterr().err == (f"datctl: {spec}: not a Kubernetes object (no apiVersion/kind); a job spec "
                                       "goes to `datctl render` (or `datctl submit`)\n")


def test_validate_without_a_job_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"datctl: no PyTorchJob or TrainJob in {path}") and "datctl render" in err
    assert len(err.splitlines()) == 1


def test_validate_counts_trainjobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from controller import spec
    job = spec.render(spec.load_spec(ROOT / "manifests" / "specs" / "dat-smoke.yaml"), api="trainjob").job
    path = tmp_path / "trainjob.yaml"
    path.write_text(spec.to_yaml([job]))
    assert cli.main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == "ok: 0 PyTorchJob(s), 1 TrainJob(s) in 1 file(s)\n"


def test_validate_broken_yaml_names_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: v1\nkind: [PyTorchJob\n")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"datctl: {path}: cannot read: not valid YAML (line 3, column 1): ") and \
        len(err.splitlines()) == 1, err


@pytest.mark.parametrize("command", ["status", "watch", "logs", "delete"])
def test_namespace_help_of_the_job_commands(command: str, capsys: pytest.CaptureFixture) -> None:
    """These take a job name, not a spec: -n cannot default to the spec's namespace."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "spec" not in out and "default: the kubeconfig context's namespace" in out


def test_exporter_help_does_not_point_to_itself(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["exporter", "--help"])
    assert "exporter --help" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "(datctl exporter --help)" in " ".join(capsys.readouterr().out.split())
