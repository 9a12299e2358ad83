"""perf.compile: when the trainer compiles its model, and the one combination it refuses."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, SYNTHETIC, torch_env
from trainer.config import ConfigError, config_from_dict, load_config, validate
from trainer.distributed import DistInfo
from trainer.train import Trainer, c_compiler, compile_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("setting, device, jointspar, expected", [
    ("auto", CUDA, False, True),   # measured 1.8x end to end on an H100
    ("auto", CUDA, True, False),   # JointSpar's requires_grad changes would recompile every step
    ("auto", CPU, False, False),
    ("on", CPU, False, True),
    ("off", CUDA, False, False),
])
def test_compile_decision(setting: str, device: torch.device, jointspar: bool, expected: bool) -> None:
    assert compile_model(setting, device, jointspar) is expected


def test_without_a_c_compiler_auto_runs_eager_and_on_is_a_config_error() -> None:
    assert compile_model("auto", CUDA, False, have_compiler=False) is False
    with pytest.raises(ConfigError, match="perf.compile=on: torch.compile needs a C compiler"):
        compile_model("on", CUDA, False, have_compiler=False)


def test_c_compiler_lookup_follows_cc_then_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert c_compiler() is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert c_compiler() is None
    fake = tmp_path / "gcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert c_compiler() == str(fake)


def test_compile_on_with_jointspar_is_refused() -> None:
    with pytest.raises(ConfigError, match="perf.compile=on with jointspar.enabled"):
        validate(config_from_dict({"perf": {"compile": "on"}, "jointspar": {"enabled": True}}))
    validate(config_from_dict({"perf": {"compile": "auto"}, "jointspar": {"enabled": True}}))


def test_boolean_compile_settings_still_work() -> None:
    """perf.compile used to be a boolean: true/false keep their meaning."""
    assert load_config(None, ["perf.compile=true"]).perf.compile == "on"
    assert load_config(None, ["perf.compile=false"]).perf.compile == "off"
    with pytest.raises(ConfigError, match="perf.compile: 'fast' is not one of auto, on, off"):
        validate(config_from_dict({"perf": {"compile": "fast"}}))


@pytest.mark.parametrize("setting, compiled", [("auto", False), ("on", True)])
def test_trainer_forward_is_the_compiled_model_only_when_asked(tmp_path, setting: str, compiled: bool) -> None:
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path), "progress": False},
                            "data": {"name": "synthetic", "synthetic_train_size": 16, "synthetic_image_size": 8,
                                     "batch_size": 8},
                            "perf": {"compile": setting}})
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                                    device=CPU))
    assert trainer.compiled is compiled
    assert (trainer.forward is not trainer.model) is compiled
    assert isinstance(trainer.forward, torch._dynamo.eval_frame.OptimizedModule) is compiled


def test_compile_on_without_a_c_compiler_is_one_line_from_the_cli(tmp_path) -> None:
    env = dict(torch_env(), CC=str(tmp_path / "missing-cc"))
    proc = subprocess.run([PYTHON, "-m", "trainer", *SYNTHETIC, "--set", f"run.output_dir={tmp_path}",
                           "--set", "perf.compile=on"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "perf.compile=on: torch.compile needs a C compiler" in proc.stderr.strip().splitlines()[-1]
