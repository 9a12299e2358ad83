import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def torch_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, **extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """A real multi-process torchrun launch (gloo on the CPU), through dat-torchrun as the pods run it."""
    cmd = [PYTHON, "-m", "trainer.launch", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or torch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    """A TCP port nothing listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cli(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """The trainer as a single process, exactly as a user runs `python -m trainer`."""
    return subprocess.run([PYTHON, "-m", "trainer", *args], cwd=ROOT, env=torch_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


SYNTHETIC = ["--set", "data.name=synthetic", "--set", "data.synthetic_train_size=256",
             "--set", "data.synthetic_test_size=64", "--set", "data.synthetic_image_size=16",
             "--set", "model.name=small_cnn", "--set", "model.width=8", "--set", "data.batch_size=32",
             "--set", "attack.steps=3", "--set", "eval.steps=3", "--set", "attack.eps=0.1",
             "--set", "run.progress=false"]


@pytest.fixture
def synthetic_args() -> list[str]:
    return list(SYNTHETIC)
