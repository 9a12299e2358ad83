"""perf.compile: when the trainer compiles its model, and which passes run compiled with JointSpar."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, SYNTHETIC, torch_env
from trainer.config import ConfigError, config_from_dict, load_config, validate
from trainer.distributed import DistInfo
from trainer.train import Trainer, c_compiler, compile_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
COMPILED = torch._dynamo.eval_frame.OptimizedModule


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", CUDA, True),   # measured 1.8x end to end on an H100
    ("auto", CPU, False),   # inductor compiles for minutes on a CPU
    ("on", CPU, True),
    ("off", CUDA, False),
])
def test_compile_decision(setting: str, device: torch.device, expected: bool) -> None:
    assert compile_model(setting, device) is expected


def test_without_a_c_compiler_auto_runs_eager_and_on_is_a_config_error() -> None:
    assert compile_model("auto", CUDA, have_compiler=False) is False
    with pytest.raises(ConfigError, match="perf.compile=on: torch.compile needs a C compiler"):
        compile_model("on", CUDA, have_compiler=False)


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


def test_boolean_compile_settings_still_work() -> None:
    """perf.compile used to be a boolean: true/false keep their meaning."""
    assert load_config(None, ["perf.compile=true"]).perf.compile == "on"
    assert load_config(None, ["perf.compile=false"]).perf.compile == "off"
    with pytest.raises(ConfigError, match="perf.compile: 'fast' is not one of auto, on, off"):
        validate(config_from_dict({"perf": {"compile": "fast"}}))


def small_trainer(tmp_path, **sections) -> Trainer:
    raw = {"run": {"output_dir": str(tmp_path), "progress": False},
           "data": {"name": "synthetic", "synthetic_train_size": 64, "synthetic_image_size": 8, "batch_size": 16},
           "model": {"name": "small_cnn", "width": 8}, "attack": {"steps": 2}, "optim": {"name": "lars"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    cfg = config_from_dict(raw)
    validate(cfg, check_paths=False)
    return Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, device=CPU))


@pytest.mark.parametrize("setting, jointspar, attack_compiled, train_compiled", [
    ("auto", False, False, False),  # on a CPU
    ("on", False, True, True),
    ("on", True, True, False),      # JointSpar: the attack only
])
def test_which_passes_run_compiled(tmp_path, setting: str, jointspar: bool, attack_compiled: bool,
                                   train_compiled: bool) -> None:
    trainer = small_trainer(tmp_path, perf={"compile": setting}, jointspar={"enabled": jointspar, "budget": 2})
    assert trainer.compiled is attack_compiled
    assert isinstance(trainer.attack_forward, COMPILED) is attack_compiled
    assert isinstance(trainer.forward, COMPILED) is train_compiled
    assert (trainer.forward is trainer.model) is not train_compiled


def test_jointspar_with_a_compiled_attack_does_not_recompile_every_step(tmp_path) -> None:
    """The attack freezes every parameter, so its graph survives JointSpar's per-step requires_grad changes;
    a compiled training pass would not (dynamo guards on requires_grad: a new graph per active set)."""
    torch._dynamo.reset()
    trainer = small_trainer(tmp_path, perf={"compile": "off", "amp": "off", "channels_last": "off"},
                            jointspar={"enabled": True, "budget": 2})
    trainer.use_compiled(torch.compile(trainer.model, backend="aot_eager"))  # inductor's C++ build is slow here
    assert trainer.forward is trainer.model
    batches = iter(trainer.batches.epoch(1))
    torch._dynamo.utils.counters.clear()
    try:
        for step in range(4):
            x, y = next(batches)
            trainer.train_step(x, y, epoch=1, step=step)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert 1 <= graphs <= 2, graphs  # the attack's graph, compiled once
        assert torch.isfinite(trainer.totals).all() and trainer.totals[3] == 4 * 16
    finally:
        torch._dynamo.reset()


def test_compile_on_without_a_c_compiler_is_one_line_from_the_cli(tmp_path) -> None:
    env = dict(torch_env(), CC=str(tmp_path / "missing-cc"))
    proc = subprocess.run([PYTHON, "-m", "trainer", *SYNTHETIC, "--set", f"run.output_dir={tmp_path}",
                           "--set", "perf.compile=on"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "perf.compile=on: torch.compile needs a C compiler" in proc.stderr.strip().splitlines()[-1]
