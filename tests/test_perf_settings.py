"""perf.compile: which passes the trainer compiles (off | attack | all), and why the training pass stays eager
by default."""
from __future__ import annotations

import functools
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, SYNTHETIC, torch_env
from trainer.config import ConfigError, config_from_dict, load_config, validate
from trainer.distributed import DistInfo
from trainer.models import build_model
from trainer.train import Trainer, c_compiler, compiled_passes, native_bf16

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
COMPILED = torch._dynamo.eval_frame.OptimizedModule


@pytest.mark.parametrize("setting, device, world_size, jointspar, expected", [
    ("auto", CUDA, 1, False, "all"),    # one rank: no all-reduce to overlap, so the training pass too
    ("auto", CUDA, 2, False, "attack"),  # the attack measured 2.1x faster compiled on an H100
    ("auto", CUDA, 1, True, "attack"),   # JointSpar's changing active set would recompile the training pass
    ("auto", CPU, 1, False, "off"),      # inductor compiles for minutes on a CPU
    ("attack", CPU, 1, False, "attack"),
    ("all", CUDA, 2, False, "all"),
    ("off", CUDA, 1, False, "off"),
])
def test_compiled_passes(setting: str, device: torch.device, world_size: int, jointspar: bool, expected: str,
                         monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert compiled_passes(setting, device, world_size=world_size, jointspar=jointspar) == expected


@pytest.mark.parametrize("capability, bf16, compiled", [
    ((6, 0), False, "off"),     # P100: no native bf16, Triton cannot generate code for it
    ((7, 5), False, "attack"),  # T4: compiles, bf16 would be emulated
    ((8, 0), True, "attack"),   # A100 on
    ((9, 0), True, "attack"),
])
def test_auto_follows_the_gpu_generation(capability, bf16, compiled, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(CUDA) is bf16
    assert compiled_passes("auto", CUDA, world_size=8) == compiled


def test_without_a_c_compiler_auto_runs_eager_and_an_explicit_setting_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert compiled_passes("auto", CUDA, have_compiler=False) == "off"
    for setting in ("attack", "all"):
        with pytest.raises(ConfigError, match=f"perf.compile={setting}: torch.compile needs a C compiler"):
            compiled_passes(setting, CUDA, have_compiler=False)


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


def test_settings_are_checked() -> None:
    assert load_config(None, ["perf.compile=false"]).perf.compile == "off"
    with pytest.raises(ConfigError, match=r"perf.compile: 'on' \(true/yes read as 'on', false/no as 'off'\) "
                                          "is not one of auto, attack, all, off"):
        load_config(None, ["perf.compile=true"])
    with pytest.raises(ConfigError, match="perf.compile=all with jointspar.enabled"):
        validate(config_from_dict({"perf": {"compile": "all"}, "jointspar": {"enabled": True}}))
    validate(config_from_dict({"perf": {"compile": "attack"}, "jointspar": {"enabled": True}}))


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
    ("attack", False, True, False),
    ("attack", True, True, False),
    ("all", False, True, True),
])
def test_which_passes_run_compiled(tmp_path, setting: str, jointspar: bool, attack_compiled: bool,
                                   train_compiled: bool) -> None:
    trainer = small_trainer(tmp_path, perf={"compile": setting}, jointspar={"enabled": jointspar, "budget": 2})
    assert isinstance(trainer.attack_forward, COMPILED) is attack_compiled
    assert isinstance(trainer.forward, COMPILED) is train_compiled
    assert (trainer.forward is trainer.model) is not train_compiled


def test_jointspar_with_a_compiled_attack_does_not_recompile_every_step(tmp_path) -> None:
    """The attack freezes every parameter, so its graph survives JointSpar's per-step requires_grad changes;
    a compiled training pass would not (dynamo guards on requires_grad: a new graph per active set)."""
    torch._dynamo.reset()
    trainer = small_trainer(tmp_path, perf={"compile": "off", "amp": "off", "channels_last": "off"},
                            jointspar={"enabled": True, "budget": 2})
    # what perf.compile=attack does, with a backend that needs no C++ build (inductor's takes minutes here)
    trainer.use_compiled(functools.partial(torch.compile, backend="aot_eager"), training_pass=False)
    batches = iter(trainer.batches.epoch(1))
    torch._dynamo.utils.counters.clear()
    try:
        for step in range(4):
            x, y = next(batches)
            trainer.train_step(x, y, epoch=1, step=step)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs == 2, graphs  # the attack's forward and its projected step, each compiled once
        assert torch.isfinite(trainer.totals).all() and trainer.totals[3] == 4 * 16
    finally:
        torch._dynamo.reset()


def gradient_hook_order(compiled: bool) -> list[str]:
    """The order in which the parameters' post-accumulate-grad hooks (what launches each all-reduce bucket)
    and the input's gradient fire in one backward."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3, 8)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    events: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: events.append(name))
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    x.register_hook(lambda g: events.append("input"))
    forward(x).pow(2).sum().backward()
    torch._dynamo.reset()
    return events


def test_an_eager_training_pass_hands_over_gradients_during_its_backward() -> None:
    """Why perf.compile=auto leaves the training pass eager: eager, the last layers' gradients are ready (and
    their all-reduce can start) long before the backward reaches the input; compiled, the whole backward is
    one node and every gradient arrives after it, so nothing overlaps."""
    eager, compiled = gradient_hook_order(False), gradient_hook_order(True)
    last_layer = [n for n in eager if n != "input"][0]
    assert eager.index(last_layer) < eager.index("input") and eager.index("input") >= len(eager) - 3
    assert compiled.index("input") < len(compiled) - 3  # the input's gradient comes with, not after, the rest


def test_compile_without_a_c_compiler_is_one_line_from_the_cli(tmp_path) -> None:
    env = dict(torch_env(), CC=str(tmp_path / "missing-cc"))
    proc = subprocess.run([PYTHON, "-m", "trainer", *SYNTHETIC, "--set", f"run.output_dir={tmp_path}",
                           "--set", "perf.compile=attack"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "perf.compile=attack: torch.compile needs a C compiler" in proc.stderr.strip().splitlines()[-1]


def test_the_compiled_attack_crafts_the_same_examples(tmp_path) -> None:
    """perf.compile=attack with inductor, as on a GPU (here its CPU backend): the same adversarial examples as
    the eager attack, up to the odd sign flip of a near-zero input gradient."""
    from trainer.attacks import attack_mode, craft

    trainer = small_trainer(tmp_path, perf={"compile": "attack", "amp": "off", "channels_last": "off"})
    x, y = next(iter(trainer.batches.epoch(1)))
    crafted = []
    for forward in (trainer.model, trainer.attack_forward):
        torch.manual_seed(0)  # the same random start
        with attack_mode(trainer.model):
            crafted.append(craft("pgd", forward, x, y, eps=0.1, alpha=0.03, steps=3))
    eager, compiled = crafted
    assert (compiled - x).abs().max() <= 0.1 + 1e-6 and compiled.min() >= 0 and compiled.max() <= 1
    assert torch.isclose(compiled, eager, atol=1e-5).float().mean() > 0.99
    assert not torch.equal(eager, x)
    torch._dynamo.reset()


def test_the_compiled_projected_step_is_the_eager_one(tmp_path) -> None:
    """perf.compile fuses the attack's projected ascent step into one kernel: the same x_adv, inside the eps
    ball and the image box (aot_eager here: inductor's C++ build takes minutes on this machine)."""
    from trainer.attacks import attack_mode, craft, pgd_step
    torch._dynamo.reset()
    trainer = small_trainer(tmp_path, perf={"compile": "off", "amp": "off", "channels_last": "off"})
    x, y = next(iter(trainer.batches.epoch(1)))
    try:
        trainer.use_compiled(functools.partial(torch.compile, backend="aot_eager"), training_pass=False)
        assert trainer.pgd_step is not pgd_step
        with attack_mode(trainer.model):
            runs = []
            for step in (pgd_step, trainer.pgd_step):
                torch.manual_seed(1)
                runs.append(craft("pgd", trainer.model, x, y, eps=0.1, alpha=0.03, steps=3, step=step))
        assert torch.equal(runs[0], runs[1])
        assert (runs[0] - x).abs().max() <= 0.1 + 1e-6 and 0 <= runs[0].min() and runs[0].max() <= 1
        assert not torch.equal(runs[0], x)
        trainer.use_compiled(functools.partial(torch.compile, backend="aot_eager"), training_pass=False,
                             fused_step=False)
        assert trainer.pgd_step is pgd_step
    finally:
        torch._dynamo.reset()
