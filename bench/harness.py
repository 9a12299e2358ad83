"""Builds the trainer's own objects for benchmarks: a Trainer from config overrides, and one fixed batch."""
from __future__ import annotations

import tempfile

import torch

from trainer.config import config_from_dict, validate
from trainer.distributed import DistInfo
from trainer.train import Trainer

# The JointSpar the benchmarks measure: a budget of half the gradient bytes over the weight tensors (the
# recommended setting; a budget in arms, as published, sends nearly every byte again once its bandit has learnt).
JOINTSPAR_SETTINGS = ("budget_unit=bytes", "budget=0.5", "arms=weights", "p_min=0.0125")


def local_dist_info(device: str = "cpu") -> DistInfo:
    """A single process, no process group (the gradient sync then sends nothing)."""
    return DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, device=torch.device(device))


def synthetic_overrides(model: str, per_rank_batch: int, world_size: int, image_size: int = 32) -> list[str]:
    """CIFAR-shaped synthetic data (no download), `model`, `per_rank_batch` images per rank and step."""
    return [
        "data.name=synthetic", f"data.synthetic_image_size={image_size}", "data.synthetic_channels=3",
        f"data.synthetic_train_size={max(64, 4 * per_rank_batch * world_size)}", "data.synthetic_test_size=16",
        f"data.batch_size={per_rank_batch * world_size}", f"model.name={model}",
        "run.progress=false", "run.resume=never", f"run.output_dir={tempfile.gettempdir()}/dat-bench",
    ]


def build_trainer(overrides: list[str], dist_info: DistInfo) -> Trainer:
    """A Trainer exactly as `dat-train` would build it from these `--set` overrides."""
    cfg = config_from_dict({}, overrides)
    validate(cfg, world_size=dist_info.world_size, check_paths=False)
    trainer = Trainer(cfg, dist_info)
    return trainer


def first_batch(trainer: Trainer, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's first training batch of `epoch`, prepared as train_epoch prepares it."""
    x, y = next(iter(trainer.batches.epoch(epoch)))
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


class StepCounter:
    """Calls trainer.train_step with increasing step numbers (the LR schedule and JointSpar see a real run)."""

    def __init__(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, epoch: int = 1) -> None:
        self.trainer, self.x, self.y, self.epoch, self.step = trainer, x, y, epoch, 0
        self.phases: list[dict[str, float]] = []

    def __call__(self) -> None:
        self.trainer.train_step(self.x, self.y, self.epoch, self.step)
        self.step += 1
        self.phases.append(self.trainer.timer.take())
