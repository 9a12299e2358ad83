"""perf.compile: when the trainer compiles its model, and the one combination it refuses."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, config_from_dict, load_config, validate
from trainer.distributed import DistInfo
from trainer.train import Trainer, compile_model

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
