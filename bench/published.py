"""A re-creation of the published reproduction's DAT step, for side-by-side timing against ours.

What it did, and what this class does:
- the model wrapped in torch DDP with ``find_unused_parameters=True`` (so every training forward walks
  the autograd graph to look for unused parameters) and buffer broadcasting on (DDP's default);
- the PGD attack run through that wrapper with the parameters still requiring grad: every attack
  iteration's ``loss.backward()`` computes weight gradients that are thrown away;
- CE(x_adv).backward() and then CE(x).backward() as two separate forward/backward passes, each
  followed by DDP's all-reduce of every gradient bucket (two all-reduces per step);
- LAMB.
The attack's backward passes run under ``no_sync()`` by default, so they add no communication: the
cheapest reading of the reproduction, which keeps our speed-up figure conservative. ``attack_sync=True``
drops that, as a plain ``loss.backward()`` on a DDP-wrapped model does, and all-reduces every
gradient after every attack iteration too.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.attacks import default_alpha
from trainer.config import AttackConfig


class PublishedStep:
    def __init__(self, model: nn.Module, attack: AttackConfig, optimizer: torch.optim.Optimizer,
                 attack_sync: bool = False) -> None:
        self.ddp = DDP(model, find_unused_parameters=True)
        self.attack, self.optimizer, self.attack_sync = attack, optimizer, attack_sync
        self.alpha = attack.alpha or default_alpha(attack.name, attack.eps, attack.steps)
        self.phases: list[dict[str, float]] = []  # host seconds of the attack and the training part, per call

    def craft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, ddp = self.attack, self.ddp
        if a.bn_eval:
            ddp.eval()
        delta = torch.empty_like(x).uniform_(-a.eps, a.eps) if a.random_start else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(a.steps):
            delta.requires_grad_(True)
            with contextlib.nullcontext() if self.attack_sync else ddp.no_sync():
                F.cross_entropy(ddp(x + delta), y).backward()
            delta = (delta.detach() + self.alpha * delta.grad.sign()).clamp(-a.eps, a.eps)
            delta = (x + delta).clamp(0, 1) - x
        ddp.train()
        return (x + delta).detach()

    def train(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)  # drop the attack's weight gradients
        adv_loss = F.cross_entropy(self.ddp(x_adv), y)
        adv_loss.backward()  # all-reduce 1
        clean_loss = F.cross_entropy(self.ddp(x), y)
        clean_loss.backward()  # all-reduce 2 (re-averaging leaves the already-averaged CE(x_adv) part as it was)
        self.optimizer.step()
        return (adv_loss + clean_loss).detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x_adv = self.craft(x, y)
        t1 = time.perf_counter()
        loss = self.train(x, x_adv, y)
        self.phases.append({"attack": t1 - t0, "train": time.perf_counter() - t1})
        return loss
