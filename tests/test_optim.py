"""The layer-wise optimizers as the trainer builds them (trainer/optim.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainer.config import OptimConfig
from trainer.optim import build_optimizer


def one_step(name: str, weight_decay: float) -> tuple[float, float, float]:
    """(norm of the weight's update, the weight's norm, norm of the bias's update) after one step."""
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    opt = build_optimizer(OptimConfig(name=name, lr=0.01, base_batch_size=256, lr_scaling="none",
                                      weight_decay=weight_decay), model, 256)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    model(torch.randn(16, 64)).square().mean().backward()
    opt.step()
    with torch.no_grad():
        return float((model.weight - w0).norm()), float(w0.norm()), float((model.bias - b0).norm())


@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_weights_get_the_trust_ratio_whatever_the_weight_decay(name: str, weight_decay: float) -> None:
    """LAMB's step on a weight is lr * |w| (trust ratio of Adam's direction), LARS's lr * trust_coeff * |w|
    (momentum starts at the gradient): with or without weight decay (timm adapts a group only when its
    weight_decay != 0 unless always_adapt is set). Biases get no trust ratio."""
    step, w_norm, bias_step = one_step(name, weight_decay)
    expected = 0.01 * w_norm * (1.0 if name == "lamb" else 0.001)
    assert step == pytest.approx(expected, rel=0.02)
    if name == "lamb":  # Adam's direction unadapted: lr * sqrt(n) for a first step
        assert bias_step == pytest.approx(0.01 * 32 ** 0.5, rel=0.02)


def test_sgd_takes_the_same_groups_without_the_trust_ratio_setting() -> None:
    step, _, _ = one_step("sgd", 0.0)
    assert step > 0
    opt = build_optimizer(OptimConfig(name="sgd"), nn.Linear(4, 2), 256)
    assert all("always_adapt" not in group for group in opt.state_dict()["param_groups"])
