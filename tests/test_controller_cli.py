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
