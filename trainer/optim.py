"""Layer-wise adaptive optimizers (timm's Lamb / Lars), SGD, and the per-iteration LR schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.optim import Lamb, Lars

from trainer.config import OptimConfig, scaled_lr




def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights get weight decay and trust-ratio adaptation; biases and norm parameters (1-d) get neither.
    timm's Lamb / Lars adapt a group only when its weight_decay != 0 unless always_adapt is set, so the weights'
    group sets it: weight_decay=0 must not turn LAMB into Adam or LARS into momentum SGD."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "always_adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "always_adapt": False}]


def build_optimizer(cfg: OptimConfig, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, global_batch)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lamb":  # no global gradient-norm clipping (timm's default clips at 1.0)
        return Lamb(groups, lr=lr, betas=tuple(cfg.betas), max_grad_norm=None)
    if cfg.name == "lars":
        return Lars(groups, lr=lr, momentum=cfg.momentum, trust_coeff=cfg.trust_coeff)
    for group in groups:  # SGD would keep it in its state_dict, where it means nothing
        group.pop("always_adapt")
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def build_schedule(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                   epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs`` (any value, 0 included), then cosine / multistep / constant;
    stepped once per iteration."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, epochs * steps_per_epoch)
    milestones = [int(m * total) for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "multistep":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
