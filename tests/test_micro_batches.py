"""Gradient accumulation (train.micro_batches): the same optimizer step as the whole batch at once.

With BatchNorm on its running statistics every image's attack and gradient are independent of the slice it
is processed in, so k micro-batches must reproduce the one-batch step up to float summation order. (In train
mode BatchNorm normalises each slice with its own statistics, as any gradient accumulation does.)"""
from __future__ import annotations

import pytest
import torch

from trainer.config import config_from_dict, validate
from trainer.distributed import DistInfo
from trainer.train import Trainer


def one_step(tmp_path, loss: str, micro: int) -> tuple[list[torch.Tensor], Trainer]:
    """(parameters before, trainer after) one train_step on the first batch of 32 images."""
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path / f"{loss}-{micro}"), "progress": False, "resume": "never"},
        "data": {"name": "synthetic", "synthetic_train_size": 64, "synthetic_image_size": 16, "batch_size": 32},
        "model": {"name": "small_cnn", "width": 8},
        "attack": {"steps": 3, "eps": 0.1, "random_start": False},
        "train": {"loss": loss, "micro_batches": micro},
        "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},  # update linear in the gradient
        "perf": {"amp": "off", "channels_last": "off"},
    })
    validate(cfg, world_size=1, check_paths=False)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                                    device=torch.device("cpu")))
    trainer.model.eval()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    x, y = next(iter(trainer.batches.epoch(1)))
    trainer.train_step(x, y, epoch=1, step=0)
    return before, trainer


@pytest.mark.parametrize("loss", ["dat", "adv", "clean"])
def test_micro_batches_reproduce_the_whole_batch_step(tmp_path, loss: str) -> None:
    before, whole = one_step(tmp_path, loss, 1)
    assert sum(float((p.detach() - b).abs().sum()) for p, b in zip(whole.model.parameters(), before)) > 1e-3  # trained
    assert int(whole.totals[3]) == 32
    for micro in (2, 4):
        _, sliced = one_step(tmp_path, loss, micro)
        for (name, p), q in zip(whole.model.named_parameters(), sliced.model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=f"{name} with {micro} micro-batches")
        torch.testing.assert_close(sliced.totals, whole.totals)  # loss sum, correct counts, images
